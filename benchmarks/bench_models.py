"""Training throughput of the giblet model: TRs per second (forward + backward + optimiser step), peak memory,
model FLOPs per TR and the share of the device's peak they reach; parameter counts of every preset.

    python benchmarks/bench_models.py                   # CPU: tiny and default
    python benchmarks/bench_models.py --device cuda     # CUDA: sherlock with bf16 autocast and torch.compile
    python benchmarks/bench_models.py --streams video=1024 audio=1024 text=3072   # with pretrained feature streams

A TR is one TR of one window (a batch of B windows of K TRs is B*K TRs), processed as in training: encoder,
decoder of the predicted brain layer and (with --decode-from both, the trainer's default) of the measured fMRI.
Each CPU preset runs in its own process so that its peak resident memory is its own.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from giblet.models.autoencoder import BrainAutoencoder, compute_losses, param_breakdown, target_variances
from giblet.models.encoder import PRESETS, ModelConfig, example_batch

SHERLOCK_EPOCH_TRS = 17 * 946  # 17 subjects x 946 TRs


def _rss_mib() -> float:
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _variances(batch):
    return target_variances(batch["video"].flatten(0, 1).numpy(), batch["audio"].flatten(0, 1).numpy(),
                            batch["text"].flatten(0, 1).numpy(), batch["has_text"].flatten().numpy())


def flops_per_step(model, batch, var, decode_from, autocast) -> int:
    "Model FLOPs (matmuls, convs, attention) of one forward + backward, counted by FlopCounterMode."
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast():
            out = model(batch, decode_from=decode_from)
        compute_losses(out, batch, var)["total"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench(preset: str, device: str, batch_size: int, steps: int, warmup: int, compile_: bool, decode_from: str,
          peak_tflops: float | None, stream_dims: dict | None = None) -> dict:
    dev = torch.device(device)
    cfg = ModelConfig.preset(preset, stream_dims=stream_dims or {})
    torch.manual_seed(0)
    model = BrainAutoencoder(cfg).to(dev).train()
    batch = example_batch(cfg, batch_size, seed=0, subjects=cfg.n_subjects > 0)
    var = _variances(batch)
    batch = {k: v.to(dev) for k, v in batch.items()}
    use_amp = dev.type == "cuda"
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)
    flops = flops_per_step(model, batch, var, decode_from, autocast)
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if dev.type == "cuda" else {}))

    def step():
        with autocast():
            out = net(batch, decode_from=decode_from)
        loss = compute_losses(out, batch, var)["total"]
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(warmup): step()
    sync(); warm_s = time.perf_counter() - t0
    if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    for _ in range(steps): loss = step()
    sync(); dt = time.perf_counter() - t0
    trs = batch_size * cfg.context_trs * steps
    res = dict(preset=preset, streams=cfg.stream_dims, device=str(dev), batch=batch_size, K=cfg.context_trs, steps=steps, decode_from=decode_from,
               amp_bf16=use_amp, compiled=compile_, params=sum(p.numel() for p in model.parameters()),
               trs_per_s=round(trs / dt, 2), s_per_step=round(dt / steps, 4), warmup_s=round(warm_s, 2),
               gflop_per_tr=round(flops / (batch_size * cfg.context_trs) / 1e9, 3),
               achieved_tflops=round(flops * steps / dt / 1e12, 3), final_loss=round(float(loss), 4))
    if dev.type == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if peak_tflops: res["matmul_share_of_peak"] = round(flops * steps / dt / 1e12 / peak_tflops, 4)
        res["sherlock_epoch_s"] = round(SHERLOCK_EPOCH_TRS / (trs / dt), 1)
    else:
        res["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        res["rss_before_steps_mib"] = round(rss0, 1)
        res["threads"] = torch.get_num_threads()
    return res


def param_counts() -> dict:
    out = {}
    for name in PRESETS:
        with torch.device("meta"): out[name] = param_breakdown(BrainAutoencoder(ModelConfig.preset(name)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", nargs="+", default=None, help="default: tiny default on cpu, sherlock on cuda")
    p.add_argument("--batch", type=int, default=None, help="windows per batch (default: 8 on cpu, 16 on cuda)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 cpu, 20 cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 cpu, 5 cuda, incl. compile)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-compile", action="store_true", help="cuda: skip torch.compile")
    p.add_argument("--decode-from", default="both", choices=["brain", "fmri", "both"])
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--streams", nargs="*", default=[], metavar="NAME=D", help="feature streams and their widths (ModelConfig.stream_dims)")
    p.add_argument("--json", action="store_true", help="print one JSON line per result")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available(): sys.exit("--device cuda: no CUDA device is available")
    if a.threads: torch.set_num_threads(a.threads)
    kw = dict(device=a.device, batch_size=a.batch or (16 if cuda else 8), steps=a.steps or (20 if cuda else 5),
              warmup=a.warmup or (5 if cuda else 2), compile_=cuda and not a.no_compile, decode_from=a.decode_from,
              peak_tflops=a.peak_tflops, stream_dims={n: int(d) for n, d in (x.split("=") for x in a.streams)})
    if a._child:  # one CPU preset in this process
        print(json.dumps(bench(a._child, **kw))); return
    if not a.json:
        print("parameters per block (M):")
        counts = param_counts()
        blocks = sorted({b for c in counts.values() for b in c} - {"total"}) + ["total"]
        print(f"  {'block':24s}" + "".join(f"{n:>12s}" for n in counts))
        for b in blocks: print(f"  {b:24s}" + "".join(f"{c.get(b, 0) / 1e6:12.3f}" for c in counts.values()))
    presets = a.presets or (["sherlock"] if cuda else ["tiny", "default"])
    for name in presets:
        if cuda: res = bench(name, **kw)
        else:
            args = [sys.executable, __file__, "--_child", name, "--batch", str(kw["batch_size"]), "--steps", str(kw["steps"]),
                    "--warmup", str(kw["warmup"]), "--decode-from", a.decode_from, "--streams", *a.streams] + (["--threads", str(a.threads)] if a.threads else [])
            res = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(json.dumps(res) if a.json else "\n" + "\n".join(f"  {k:22s} {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
