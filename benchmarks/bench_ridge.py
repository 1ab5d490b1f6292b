"""Time and memory of the himalaya baselines (banded ridge and ridge, `giblet.evaluation.fit_baselines`) and
optionally the noise ceiling, at Sherlock scale on random data.

    python benchmarks/bench_ridge.py                      # 946 TRs (700 train), 3 bands of 1000 features, 0-12 s delays at TR 1.5, 85k voxels
    python benchmarks/bench_ridge.py --n-voxels 20000     # smaller
    python benchmarks/bench_ridge.py --device cuda        # himalaya's torch_cuda backend
    python benchmarks/bench_ridge.py --ceiling            # also the noise ceiling of 17 subjects (memmap on disk)

Prints wall time per stage, the process's peak resident memory, and for the ceiling the peak of Python-tracked
allocations (tracemalloc: NumPy buffers, not the memory-mapped input).
"""
import argparse
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

from giblet.evaluation import fit_baselines
from giblet.metrics import delay_features, noise_ceiling, voxel_r


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2      # ru_maxrss is in KiB on Linux


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-trs", type=int, default=946)
    ap.add_argument("--n-train", type=int, default=700)
    ap.add_argument("--n-features", type=int, default=3000, help="split into 3 equal bands")
    ap.add_argument("--n-voxels", type=int, default=85000)
    ap.add_argument("--n-iter", type=int, default=20, help="random-search draws of the band weights")
    ap.add_argument("--n-folds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--ceiling", action="store_true", help="also time noise_ceiling on a memmap of subjects")
    ap.add_argument("--n-subjects", type=int, default=17)
    ap.add_argument("--no-ridge", action="store_true", help="skip the ridge (with --ceiling: time only the ceiling)")
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    x = rng.standard_normal((args.n_trs, args.n_features), dtype=np.float32)
    n_sig = args.n_voxels // 10                                     # 10% of voxels carry a planted delayed signal
    w = rng.standard_normal((4 * 20, n_sig)).astype(np.float32) / np.sqrt(80)
    sig = delay_features(x[:, :20], (2, 3, 4, 5)) @ w
    bold = rng.standard_normal((args.n_trs, args.n_voxels), dtype=np.float32)
    bold[:, :n_sig] += sig / sig.std(0)
    gap = 22
    train, val = np.arange(args.n_train), np.arange(args.n_train + gap, args.n_trs)
    print(f"data: {args.n_trs} TRs ({len(train)} train, {len(val)} test), {args.n_features} features x 9 delays (0-12 s), "
          f"{args.n_voxels} voxels, {args.n_iter} random-search draws, {args.n_folds} folds, device {args.device}, "
          f"{torch.get_num_threads()} torch threads; made in {time.perf_counter() - t0:.1f} s")

    if not args.no_ridge: bench_ridge(x, bold, train, val, n_sig, args)
    del bold
    if args.ceiling: bench_ceiling(rng, args)


def bench_ridge(x, bold, train, val, n_sig, args):
    third = x.shape[1] // 3
    bands = {f"band{k}": x[:, k * third:(k + 1) * third] for k in range(3)}
    t0 = time.perf_counter()
    fit = fit_baselines(bands, bold[train], train, tr=1.5, n_folds=args.n_folds, n_iter=args.n_iter, device=args.device)
    t_fit = time.perf_counter() - t0
    for name in ("banded_ridge", "ridge"):
        t0 = time.perf_counter()
        r = voxel_r(fit.predict(name, val), bold[val])
        print(f"{name}: fit {fit.info['seconds'][name]:.1f} s; predict + score {len(val)} TRs: {time.perf_counter() - t0:.1f} s; "
              f"test r planted {np.mean(r[:n_sig]):.3f}, null {np.mean(r[n_sig:]):.3f}")
    print(f"both fits with the design: {t_fit:.1f} s; peak RSS {peak_rss_gb():.2f} GB")


def bench_ceiling(rng, args):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bold.npy"
        shape = (args.n_subjects, args.n_trs, args.n_voxels)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        shared = rng.standard_normal((args.n_trs, args.n_voxels), dtype=np.float32)
        for i in range(args.n_subjects):
            mm[i] = shared + 2.0 * rng.standard_normal((args.n_trs, args.n_voxels), dtype=np.float32)
        mm.flush(); del mm, shared
        src = np.load(path, mmap_mode="r")
        subject_gb = args.n_trs * args.n_voxels * 4 / 1e9
        for method in ("loo", "split_half"):
            tracemalloc.start()
            t0 = time.perf_counter()
            c = noise_ceiling(src, method=method, n_splits=5)
            dt = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] / 1e9
            tracemalloc.stop()
            print(f"noise_ceiling {method} ({shape}, whole array {subject_gb * args.n_subjects:.1f} GB): {dt:.1f} s, "
                  f"tracked peak {peak:.2f} GB ({peak / subject_gb:.1f} subjects); mean ceiling {c.mean():.3f} "
                  f"(analytical {1 / np.sqrt(1 + 4 / args.n_subjects):.3f})")


if __name__ == "__main__":
    main()
