"""Feature-cache size, write time, checksum-verification time and peak memory at Sherlock scale, and DeviceLoader batch rate.

The study is stood in for by arrays of the real shapes (946 TRs, 19 frames/TR at 160x90, 128 mels x 64 frames,
17 subjects x 85k voxels) whose BOLD is produced one subject at a time, so the benchmark needs no 5.5 GB input.
With --study, it instead builds the cache of a real study folder (e.g. a `giblet-synth` preset) with `load_study`
and reports the build time, peak RSS (and the RSS after imports, before the build) and cache size. With --subsets
2,5 it builds, each in a fresh process, the study of the first 2 and of the first 5 subjects (a folder of links),
so the memory a subject adds can be read off.
usage: python benchmarks/bench_dataset.py [--subjects 17] [--voxels 85000] [--dir /tmp] [--study FOLDER [--subsets 2,5]]
"""
import argparse, os, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from giblet.alignment.sync import Aligned
from giblet.data.dataset import (ContextDataset, DeviceLoader, StudyTensors, aligned_to_arrays, arrays_to_aligned,
                                 block_split, fit_normaliser, load_arrays, load_study, save_arrays)
from giblet.io import file_checksum


def peak_rss_gb()->float: return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class LazyBold:
    "(n_subjects, n_trs, n_voxels) raw BOLD made one subject at a time."
    def __init__(self, n_sub, n_trs, n_vox): self.shape, self.ndim = (n_sub, n_trs, n_vox), 3
    def __len__(self): return self.shape[0]
    def __getitem__(self, s):
        rng = np.random.default_rng(int(s) if not isinstance(s, tuple) else int(s[0]))
        return rng.normal(1000, 20, self.shape[1:]).astype(np.float32)


def main(n_sub, n_vox, where):
    n_trs = 946
    rng = np.random.default_rng(0)
    mask = np.zeros((61, 73, 61), np.uint8); mask.reshape(-1)[:n_vox] = 1
    al = Aligned(video=rng.integers(0, 255, (n_trs, 19, 90, 160, 3), dtype=np.uint8),
                 audio=rng.normal(-40, 10, (n_trs, 128, 64)).astype(np.float32),
                 text=rng.normal(size=(n_trs, 256)).astype(np.float32), has_text=np.ones(n_trs, bool),
                 fmri=LazyBold(n_sub, n_trs, n_vox), tr=1.5, tr_start=np.arange(n_trs) * 1.5,
                 run=np.zeros(n_trs, int), volume=np.arange(n_trs), texts=[""] * n_trs,
                 mask=nib.Nifti1Image(mask, np.eye(4)))
    root = Path(tempfile.mkdtemp(dir=where))
    rss0 = peak_rss_gb()
    t0 = time.perf_counter()
    save_arrays(root / "cache", *aligned_to_arrays(al, show_progress=False))
    t_write = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in (root / "cache").iterdir())
    print(f"cache at Sherlock scale ({n_sub} subjects x {n_vox} voxels): {size / 1e9:.2f} GB "
          f"(target <= 4 GB; the system this replaces needed 58 GB), written and checksummed in {t_write:.1f} s")
    print(f"peak RSS {rss0:.2f} GB before the write (the stand-in stimulus arrays), {peak_rss_gb():.2f} GB after")
    for p in sorted((root / "cache").glob("*.npy")): print(f"  {p.name:18s} {p.stat().st_size / 1e6:9.1f} MB")
    fmri = root / "cache" / "fmri.npy"
    t0 = time.perf_counter(); file_checksum(fmri); dt = time.perf_counter() - t0
    print(f"blake2b over the page cache: {fmri.stat().st_size / dt / 1e9:.2f} GB/s")
    t0 = time.perf_counter(); back = load_arrays(root / "cache", verify=True); dt = time.perf_counter() - t0
    print(f"verify the whole cache (every checksum): {dt:.1f} s = {size / dt / 1e9:.2f} GB/s; "
          f"at 3.5 GB (Sherlock): {3.5e9 / (size / dt):.1f} s")
    t0 = time.perf_counter(); back = arrays_to_aligned(*load_arrays(root / "cache"))
    print(f"memory-mapped load (sizes and time stamps only): {time.perf_counter() - t0:.3f} s")
    x = back.fmri[0]; ref = al.fmri[0]
    print(f"float16 BOLD storage: max |error| / voxel std = {np.max(np.abs(x - ref) / ref.std(0)):.2e}")
    sp = block_split(n_trs, 1.5)
    t0 = time.perf_counter(); nz = fit_normaliser(back.fmri, back.audio, sp.train)
    st = StudyTensors(back, nz, subjects="average"); print(f"normaliser + tensors: {time.perf_counter() - t0:.1f} s")
    dl = DeviceLoader(ContextDataset(st, sp.train, k=16), batch_size=8, shuffle=True)
    t0 = time.perf_counter(); n = 0
    for i, b in enumerate(dl):
        n += b["video"].shape[0]
        if i == 20: break
    dt = time.perf_counter() - t0
    print(f"DeviceLoader (CPU): {n / dt:.0f} windows/s of 16 TRs ({n * 16 / dt:.0f} TRs/s)")
    print(f"peak RSS {peak_rss_gb():.2f} GB")
    shutil.rmtree(root)


def rss_now_gb()->float:
    "Resident memory of this process now (Linux)."
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def build_study(study, where):
    "Build the cache of a study folder with `load_study`: time, RSS before, peak RSS, size."
    root = Path(tempfile.mkdtemp(dir=where))
    before = rss_now_gb()
    t0 = time.perf_counter()
    al = load_study(study, cache_dir=root, show_progress=False)
    dt = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in Path(al.video.filename).parent.iterdir())
    print(f"{study}: {al.n_subjects} subjects x {al.n_trs} TRs x {al.n_voxels} voxels; cache built in {dt:.0f} s, "
          f"{size / 1e9:.2f} GB on disk, RSS {before:.2f} GB after imports, peak RSS {peak_rss_gb():.2f} GB", flush=True)
    shutil.rmtree(root)


def build_subsets(study, subsets, where):
    "Build the study of the first k subjects, for each k, each in a fresh process (peak RSS is per process)."
    study = Path(study)
    for k in subsets:
        d = Path(tempfile.mkdtemp(dir=where)) / f"first{k}"
        (d / "sherlock_nii").mkdir(parents=True)
        for p in study.iterdir():
            if p.is_file(): os.symlink(p.resolve(), d / p.name)
        for p in sorted((study / "sherlock_nii").iterdir(), key=lambda p: p.name)[:k]:
            os.symlink(p.resolve(), d / "sherlock_nii" / p.name)
        subprocess.run([sys.executable, __file__, "--study", str(d)] + (["--dir", where] if where else []), check=True)
        shutil.rmtree(d.parent)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=17)
    ap.add_argument("--voxels", type=int, default=85_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--study", default=None)
    ap.add_argument("--subsets", default=None)
    a = ap.parse_args()
    if a.study and a.subsets: build_subsets(a.study, [int(k) for k in a.subsets.split(",")], a.dir)
    elif a.study: build_study(a.study, a.dir)
    else: main(a.subjects, a.voxels, a.dir)
