"""Sherlock-scale fMRI loading: time and peak memory of `shared_mask` and `load_subjects`.

Writes a few int16 .nii.gz subjects of the Sherlock shape (61 x 73 x 61 voxels, 946 TRs, about 85 k voxels in the
mask) into a temporary folder, then measures each step in a fresh Python process, so that each peak RSS
(`resource.getrusage().ru_maxrss`) belongs to that step alone. `tracemalloc` gives the peak of numpy/Python
allocations; for the in-memory load, peak minus the output's size is what streaming costs on top of the result.
Per-subject times (wall and CPU: on a shared machine, CPU time is the steadier figure) are extrapolated to the
17 Sherlock subjects.

    python benchmarks/bench_fmri.py [--subjects 3] [--trs 946] [--folder DIR]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree's giblet

SHAPE = (61, 73, 61)
SHERLOCK_SUBJECTS = 17
MB = 1e6


def brain(shape=SHAPE, n_target=87_500):
    "An ellipsoid of about `n_target` voxels (the 10th-percentile cut leaves about 85 k in the mask)."
    c = [np.arange(s) - (s - 1) / 2 for s in shape]
    x, y, z = np.meshgrid(*c, indexing="ij")
    k = (n_target / (4 / 3 * np.pi * np.prod([s / 2 for s in shape]))) ** (1 / 3)
    a, b, cc = [k * s / 2 for s in shape]
    return (x / a) ** 2 + (y / b) ** 2 + (z / cc) ** 2 <= 1


def write_subjects(folder, n_subjects, n_trs, tr=1.5):
    "int16 .nii.gz scans of the Sherlock shape, values around 1000 with per-voxel noise levels; returns the paths."
    import nibabel as nib
    Path(folder).mkdir(parents=True, exist_ok=True)
    inside = brain()
    affine = np.array([[-3.0, 0, 0, 90], [0, 3.0, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])
    paths = []
    for s in range(n_subjects):
        rng = np.random.default_rng(s)
        base = rng.uniform(600, 1400, inside.sum())
        sd = rng.uniform(5, 25, inside.sum())
        data = np.zeros(SHAPE + (n_trs,), np.int16, order="F")  # volumes contiguous
        for t in range(n_trs):
            data[..., t][inside] = np.rint(base + sd * rng.standard_normal(inside.sum())).astype(np.int16)
        img = nib.Nifti1Image(data, affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = tr
        path = Path(folder) / f"sherlock_movie_s{s + 1}.nii.gz"
        nib.save(img, path)
        paths.append(path)
        del data, img
    return paths


def measure(step, folder):
    "One step in this (fresh) process; prints a JSON line of figures."
    import nibabel as nib
    from giblet.data.fmri import find_niftis, shared_mask
    from giblet.data.subjects import load_subjects
    if step == "write":
        write_subjects(Path(folder) / "sherlock_nii", *map(int, os.environ["BENCH_SIZE"].split()))
        return
    paths = find_niftis(Path(folder) / "sherlock_nii")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if step == "mask":
        mask = shared_mask(paths)
        nib.save(mask, Path(folder) / "mask.nii")
        res = dict(n_voxels=int(np.asarray(mask.dataobj).sum()), out_bytes=0)
    else:
        mask = nib.load(Path(folder) / "mask.nii")
        out = Path(folder) / "bold.npy" if step == "memmap" else None
        x = load_subjects(paths, mask, out=out)
        res = dict(shape=list(x.shape), out_bytes=int(x.nbytes))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res.update(step=step, seconds=seconds, cpu_s=cpu, per_subject_s=seconds / len(paths), n_subjects=len(paths),
               tracemalloc_peak=peak, rss_before=rss0, rss_peak=rss)
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--trs", type=int, default=946)
    ap.add_argument("--folder", help="use (or fill) this folder instead of a temporary one")
    ap.add_argument("--measure", choices=["write", "mask", "load", "memmap"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure: return measure(args.measure, args.folder)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp); folder.mkdir(parents=True, exist_ok=True)
        run = lambda step, **env: subprocess.run(  # each step in a fresh process, this one stays small
            [sys.executable, __file__, "--measure", step, "--folder", str(folder)], capture_output=True, text=True,
            env={**os.environ, **env})
        if not list(folder.glob("sherlock_nii/*.nii.gz")):
            t0 = time.perf_counter()
            r = run("write", BENCH_SIZE=f"{args.subjects} {args.trs}")
            if r.returncode: sys.exit(f"writing failed:\n{r.stderr}")
            files = list(folder.glob("sherlock_nii/*.nii.gz"))
            print(f"wrote {len(files)} subjects x {args.trs} TRs x {SHAPE} int16 .nii.gz "
                  f"({sum(p.stat().st_size for p in files) / MB:.0f} MB) in {time.perf_counter() - t0:.1f} s")
        vol64 = np.prod(SHAPE) * 8
        for step in ["mask", "load", "memmap"]:
            r = run(step)
            if r.returncode: sys.exit(f"{step} failed:\n{r.stderr}")
            m = json.loads(r.stdout.strip().splitlines()[-1])
            n = m["n_subjects"]
            cpu_sub = m["cpu_s"] / n
            line = (f"{step:7s} {m['seconds']:6.1f} s wall, {m['cpu_s']:.1f} s CPU; per subject {m['per_subject_s']:.1f} s "
                    f"wall / {cpu_sub:.1f} s CPU, so ~{m['per_subject_s'] * SHERLOCK_SUBJECTS:.0f} s wall / "
                    f"~{cpu_sub * SHERLOCK_SUBJECTS:.0f} s CPU for {SHERLOCK_SUBJECTS} subjects\n        "
                    f"peak RSS {m['rss_peak'] / MB:.0f} MB (process baseline {m['rss_before'] / MB:.0f} MB)  "
                    f"tracemalloc peak {m['tracemalloc_peak'] / MB:.1f} MB")
            if step == "mask": line += f"  mask voxels {m['n_voxels']}"
            else:
                extra = m["tracemalloc_peak"] - (m["out_bytes"] if step == "load" else 0)
                line += (f"\n        output {tuple(m['shape'])} float32 {m['out_bytes'] / MB:.0f} MB"
                         f"{'' if step == 'load' else ' (memmap on disk)'}; "
                         f"streaming overhead {extra / MB:.1f} MB = {extra / vol64:.1f} float64 volumes")
            print(line)
            if step == "load":
                print(f"        {SHERLOCK_SUBJECTS} Sherlock subjects in memory: output "
                      f"{m['out_bytes'] / n * SHERLOCK_SUBJECTS / 1e9:.2f} GB + {extra / MB:.1f} MB streaming overhead; "
                      f"into a .npy memmap: one subject ({m['out_bytes'] / n / MB:.0f} MB) mapped at a time + the overhead")


if __name__ == "__main__":
    main()
