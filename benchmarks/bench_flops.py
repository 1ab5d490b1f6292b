"""Matmul FLOPs and memory of one training step of a model preset, counted on the CPU, and what they imply for an epoch
on a GPU at a given utilisation (for sizing a run before a GPU is at hand).

FLOPs come from torch's FlopCounterMode. Memory is the weights, their gradients, AdamW's two moments and the weight
average (4 bytes each per parameter), plus the activations autograd keeps for the backward pass, measured as the
bytes of the distinct tensors it saves (`torch.autograd.graph.saved_tensors_hooks`) in float32; under bf16 autocast
most of them are half that. The allocator's slack and the largest temporary are not counted.

usage: python benchmarks/bench_flops.py [--preset sherlock] [--batch 2] [--train-batch 16] [--train-trs 660] [--peak-tflops 989] [--mfu 0.3]
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
    p.add_argument("--train-batch", type=int, default=16, help="windows per training step, for the memory estimate")
    p.add_argument("--train-trs", type=int, default=660, help="training TRs per subject (Sherlock: 946 less the held-out blocks)")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--mfu", type=float, default=0.3, help="assumed matmul utilisation")
    a = p.parse_args()
    cfg = ModelConfig.preset(a.preset)
    model = BrainAutoencoder(cfg)
    n_params = sum(q.numel() for q in model.parameters())
    batch = example_batch(cfg, batch_size=a.batch, subjects=cfg.n_subjects > 0)
    var = {k: 1.0 for k in ("video", "audio", "text")}
    saved = {}
    def pack(t):   # one entry per storage: a tensor saved twice, or a view of a saved one, is held once
        saved[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as fc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(batch, decode_from="both")
            loss = compute_losses(out, batch, var)["total"]
        loss.backward()
    secs = time.perf_counter() - t0
    act = sum(saved.values()) / a.batch     # bytes kept for the backward pass, per window
    states = 5 * 4 * n_params               # weights, gradients, two AdamW moments, the weight average
    per_window = fc.get_total_flops() / a.batch
    windows = a.train_trs * max(cfg.n_subjects, 1)   # stride 1: about one window per training TR and subject
    epoch_flops = per_window * windows
    print(f"[{a.preset}] {n_params / 1e6:.1f} M parameters, {cfg.n_voxels} voxels, windows of {cfg.context_trs} TRs")
    print(f"[{a.preset}] one training step (forward, both decoders, backward): {per_window / 1e12:.3f} TFLOP per window, "
          f"{per_window / cfg.context_trs / 1e9:.1f} GFLOP per window-TR (counted on CPU in {secs:.1f} s for {a.batch} windows)")
    print(f"[{a.preset}] an epoch of {windows} windows ({a.train_trs} TRs x {max(cfg.n_subjects, 1)} subjects): "
          f"{epoch_flops / 1e15:.1f} PFLOP -> {epoch_flops / (a.peak_tflops * 1e12 * a.mfu):.1f} s at {a.mfu:.0%} of "
          f"{a.peak_tflops:.0f} TFLOP/s")
    print(f"[{a.preset}] memory: {states / 2**30:.2f} GiB of weights, gradients, AdamW moments and weight average; "
          f"{act / 2**30:.2f} GiB of saved activations per window in float32 -> about "
          f"{(states + a.train_batch * act) / 2**30:.1f} GiB at {a.train_batch} windows per step "
          f"({(states + a.train_batch * act / 2) / 2**30:.1f} GiB if bf16 autocast halves the activations)")


if __name__ == "__main__":
    main()
