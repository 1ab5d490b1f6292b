"""Speed of `giblet.alignment.hrf.convolve_hrf` on a Sherlock-sized feature matrix.

Prints, from one run:
- the time of `x.copy()` (the memory-bound floor);
- the time of `convolve_hrf(x, tr)`;
- the time of a per-column `scipy.signal.convolve` loop, timed on a subset of columns and scaled to all columns;
- both ratios, against the targets (at most 5x the copy; at least 4x faster than the scipy loop).

Usage: python benchmarks/bench_hrf.py [--n-trs 920] [--n-cols 100000] [--tr 1.5] [--repeats 5] [--scipy-cols 2000]
       [--fft]   (also time a torch.fft convolution, for reference)
"""
import argparse
import resource
import time

import numpy as np
import scipy.signal
import torch

from giblet.alignment.hrf import convolve_hrf, hrf_kernel


def best_of(fn, repeats):
    "The fastest of `repeats` timed calls of `fn` (seconds), after one untimed warm-up call."
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_of_alternating(fns, repeats):
    "The fastest of `repeats` timed calls of each of `fns`, taken in turn so that all see the same machine load."
    for fn in fns: fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def scipy_loop(x, h, cols):
    "Per-column scipy.signal.convolve over `cols`, truncated to the input length (causal)."
    out = np.empty((x.shape[0], len(cols)), x.dtype)
    for i, j in enumerate(cols):
        out[:, i] = scipy.signal.convolve(x[:, j], h)[: x.shape[0]]
    return out


def fft_conv(x, h):
    "Causal convolution by torch.fft along time (zero-padded, so not circular)."
    xt = torch.from_numpy(x)
    n = x.shape[0] + len(h) - 1
    ht = torch.from_numpy(h)
    y = torch.fft.irfft(torch.fft.rfft(xt, n=n, dim=0) * torch.fft.rfft(ht, n=n)[:, None], n=n, dim=0)[: x.shape[0]]
    return y.numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-trs", type=int, default=920)
    ap.add_argument("--n-cols", type=int, default=100_000)
    ap.add_argument("--tr", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scipy-cols", type=int, default=2000, help="columns the scipy loop is timed on")
    ap.add_argument("--fft", action="store_true", help="also time a torch.fft convolution")
    a = ap.parse_args()

    x = np.random.default_rng(0).standard_normal((a.n_trs, a.n_cols), dtype=np.float32)
    h = hrf_kernel(a.tr).astype(np.float32)
    print(f"x: {x.shape} {x.dtype} ({x.nbytes / 2**20:.0f} MiB), tr {a.tr} s, kernel {len(h)} taps, "
          f"torch threads {torch.get_num_threads()}")

    t_copy, t_ours = best_of_alternating([lambda: x.copy(), lambda: convolve_hrf(x, a.tr)], a.repeats)
    cols = np.linspace(0, a.n_cols - 1, min(a.scipy_cols, a.n_cols)).astype(int)
    t_sub = best_of(lambda: scipy_loop(x, h, cols), max(1, a.repeats // 2))
    t_scipy = t_sub * a.n_cols / len(cols)

    err = np.abs(convolve_hrf(x[:, cols], a.tr) - scipy_loop(x, h, cols)).max()
    print(f"max |ours - scipy| on the subset: {err:.2e}")
    print(f"x.copy()            : {t_copy * 1e3:9.1f} ms")
    print(f"convolve_hrf        : {t_ours * 1e3:9.1f} ms")
    print(f"scipy.signal loop   : {t_scipy * 1e3:9.1f} ms  (timed on {len(cols)} of {a.n_cols} columns: "
          f"{t_sub * 1e3:.1f} ms, scaled by {a.n_cols / len(cols):.0f})")
    if a.fft:
        t_fft = best_of(lambda: fft_conv(x, h), max(1, a.repeats // 2))
        print(f"torch.fft (reference): {t_fft * 1e3:8.1f} ms  ({t_fft / t_copy:.1f}x copy)")
    r_copy, r_scipy = t_ours / t_copy, t_scipy / t_ours
    print(f"ratio ours / copy   : {r_copy:6.2f}x  (target <= 5x: {'ok' if r_copy <= 5 else 'MISSED'})")
    print(f"ratio scipy / ours  : {r_scipy:6.2f}x  (target >= 4x: {'ok' if r_scipy >= 4 else 'MISSED'})")
    print(f"peak RSS            : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
