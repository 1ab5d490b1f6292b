"""Training speed: seconds per epoch and TRs per second for the README's main job (the embedded synthetic study with
the default options), and with --sherlock, a `sherlock`-preset run on a Sherlock-sized synthetic study (CUDA).

usage: python benchmarks/bench_train.py [--epochs N] [--cache DIR] [--device cpu|cuda] [--sherlock]
Prints one line per measurement; nothing is asserted.
"""
import argparse
import resource
import tempfile
import time

import torch

from giblet.training.config import TrainConfig
from giblet.training.data import prepare_data
from giblet.training.distributed import resolve_device
from giblet.training.trainer import Trainer


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(cfg: TrainConfig, epochs: int, label: str):
    device = resolve_device(cfg.run.device)
    t0 = time.perf_counter()
    data = prepare_data(cfg, device)
    t_data = time.perf_counter() - t0
    tr = Trainer(data, cfg)
    n_params = sum(p.numel() for p in tr.model.parameters())
    print(f"[{label}] data ready in {t_data:.1f} s (generation and feature cache if new): {data.aligned.n_trs} TRs, "
          f"{data.aligned.n_subjects} subjects, {data.aligned.n_voxels} voxels; model {n_params / 1e6:.2f} M parameters, "
          f"{len(tr.train_ds)} training windows of {tr.k} TRs, {len(tr.loader)} batches of {cfg.optim.batch_size}; "
          f"device {device}, {torch.get_num_threads()} CPU threads")
    if device.type == "cuda": torch.cuda.reset_peak_memory_stats(device)
    for e in range(epochs):
        if device.type == "cuda": torch.cuda.synchronize(device)
        t = time.perf_counter()
        tr.train_epoch()
        if device.type == "cuda": torch.cuda.synchronize(device)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        row = tr.evaluate()
        t_eval = time.perf_counter() - t
        tr.epoch += 1
        trs = len(tr.train_ds) * tr.k
        print(f"[{label}] epoch {e + 1}: train {t_train:.2f} s ({len(data.split.train) / t_train:.1f} training TRs/s, "
              f"{trs / t_train:.0f} window-TRs/s), validation {t_eval:.2f} s, val voxel r {row['val_voxel_r_mean']:.4f}")
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    print(f"[{label}] peak RSS {peak_rss_mb():.0f} MB{mem}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--cache", default=None, help="cache folder (default: a new temporary folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--sherlock", action="store_true", help="also the sherlock preset on a Sherlock-sized study")
    a = p.parse_args()
    cache = a.cache or tempfile.mkdtemp(prefix="giblet-bench-")
    bench(TrainConfig.make(cache_dir=cache, device=a.device, progress=False), a.epochs, "main job")
    if a.sherlock:
        cfg = TrainConfig.make(cache_dir=cache, device=a.device, progress=False, preset="sherlock", subjects="each",
                          batch_size=8, synthetic=dict(preset="sherlock", seed=0))
        bench(cfg, a.epochs, "sherlock")


if __name__ == "__main__":
    main()
