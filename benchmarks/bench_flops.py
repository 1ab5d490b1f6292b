"""Matmul FLOPs of one training step of a model preset, counted by torch's FlopCounterMode on the CPU, and what they
imply for an epoch on a GPU at a given utilisation (for sizing a run before a GPU is at hand).

usage: python benchmarks/bench_flops.py [--preset sherlock] [--batch 2] [--train-trs 660] [--peak-tflops 989] [--mfu 0.3]
The H200's dense bf16 peak is about 989 TFLOP/s. Prints figures; nothing is asserted.
"""
import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from giblet.models.autoencoder import BrainAutoencoder, compute_losses
from giblet.models.encoder import ModelConfig, example_batch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="sherlock")
    p.add_argument("--batch", type=int, default=2, help="windows per counted step")
    p.add_argument("--train-trs", type=int, default=660, help="training TRs per subject (Sherlock: 946 less the held-out blocks)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--mfu", type=float, default=0.3, help="assumed matmul utilisation")
    a = p.parse_args()
    cfg = ModelConfig.preset(a.preset)
    model = BrainAutoencoder(cfg)
    n_params = sum(q.numel() for q in model.parameters())
    batch = example_batch(cfg, batch_size=a.batch, subjects=cfg.n_subjects > 0)
    var = {k: 1.0 for k in ("video", "audio", "text")}
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as fc:
        out = model(batch, decode_from="both")
        compute_losses(out, batch, var)["total"].backward()
    secs = time.perf_counter() - t0
    per_window = fc.get_total_flops() / a.batch
    windows = a.train_trs * max(cfg.n_subjects, 1)   # stride 1: about one window per training TR and subject
    epoch_flops = per_window * windows
    print(f"[{a.preset}] {n_params / 1e6:.1f} M parameters, {cfg.n_voxels} voxels, windows of {cfg.context_trs} TRs")
    print(f"[{a.preset}] one training step (forward, both decoders, backward): {per_window / 1e12:.3f} TFLOP per window, "
          f"{per_window / cfg.context_trs / 1e9:.1f} GFLOP per window-TR (counted on CPU in {secs:.1f} s for {a.batch} windows)")
    print(f"[{a.preset}] an epoch of {windows} windows ({a.train_trs} TRs x {max(cfg.n_subjects, 1)} subjects): "
          f"{epoch_flops / 1e15:.1f} PFLOP -> {epoch_flops / (a.peak_tflops * 1e12 * a.mfu):.1f} s at {a.mfu:.0%} of "
          f"{a.peak_tflops:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
