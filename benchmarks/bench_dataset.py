"""Feature-cache size, write time, checksum-verification time and peak memory at Sherlock scale, and the training loader's batch rate.

The study is stood in for by arrays of the real shapes (946 TRs, 19 frames/TR at 160x90, 128 mels x 64 frames,
17 subjects x 85k voxels) whose BOLD is produced one subject at a time, so the benchmark needs no 5.5 GB input.
With --study, it instead builds the cache of a real study folder (e.g. a `giblet-synth` preset) with `load_study`
and reports the build time, peak RSS (and the RSS after imports, before the build) and cache size. With --subsets
2,5 it builds, each in a fresh process, the study of the first 2 and of the first 5 subjects (a folder of links),
so the memory a subject adds can be read off.

With --bold FOLDER, it times the BOLD stream of a study folder's scans alone, read once (`OnePassBold`: the mask's
statistics and a local copy in one pass) against read twice (`shared_mask`, then `SubjectBold`), each way in a fresh
process under `/usr/bin/time -v`, alternating, --repeat times; both write the same bytes.

With --full FOLDER --cache CACHE, it measures a study at full scale as a user meets it, each step a fresh process under
`/usr/bin/time -v` with GIBLET_CACHE=CACHE: the first build of the caches, a second run (every cache hit), and a run
with only the frame size changed; per step the wall time, the peak RSS ("Maximum resident set size"), the cache folders
added and the cache's size on disk. --entry says what builds: `load_study` (giblet.dataset, each scan read once)
or `giblet-cache --preset PRESET` (the console script, through the study spec); --size W,H is the changed frame size.
usage: python benchmarks/bench_dataset.py [--subjects 17] [--voxels 85000] [--dir /tmp] [--study FOLDER [--subsets 2,5]]
       python benchmarks/bench_dataset.py --bold FOLDER [--repeat 2] [--dir /tmp]
       python benchmarks/bench_dataset.py --full FOLDER --cache CACHE [--entry load_study|giblet-cache] [--size 128,72] [--preset sherlock]
"""
import argparse, json, os, re, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

import nibabel as nib
import numpy as np

from giblet.alignment.sync import Aligned
from giblet.dataset import (ContextDataset, StreamedArray, StudyTensors, _DecodedBold, _encode_fmri,
                                 block_split, fit_normaliser, load_arrays, load_study, save_arrays, stream_folders)
from giblet.io import file_checksum
from giblet.training.trainer import ShardedLoader


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
    center, scale, codes = _encode_fmri(al.fmri, show_progress=False)
    save_arrays(root / "cache", dict(video=StreamedArray(al.video.shape, np.uint8, iter([al.video])), audio=al.audio.astype(np.float16),
                                     text=al.text, has_text=al.has_text, fmri=codes,
                                     fmri_center=StreamedArray(center.shape, np.float32, iter([center])),
                                     fmri_scale=StreamedArray(scale.shape, np.float32, iter([scale]))))
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
    t0 = time.perf_counter(); arrays = load_arrays(root / "cache")[0]
    back = Aligned(arrays["video"], arrays["audio"], arrays["text"], arrays["has_text"],
                   _DecodedBold(arrays["fmri"], arrays["fmri_center"], arrays["fmri_scale"]), 1.5, al.tr_start, al.run,
                   al.volume, al.texts, al.mask)
    print(f"memory-mapped load (sizes and time stamps only): {time.perf_counter() - t0:.3f} s")
    x = back.fmri[0]; ref = al.fmri[0]
    print(f"float16 BOLD storage: max |error| / voxel std = {np.max(np.abs(x - ref) / ref.std(0)):.2e}")
    sp = block_split(n_trs, 1.5)
    t0 = time.perf_counter(); nz = fit_normaliser(back.fmri, back.audio, sp.train)
    st = StudyTensors(back, nz, subjects="average"); print(f"normaliser + tensors: {time.perf_counter() - t0:.1f} s")
    dl = ShardedLoader(ContextDataset(st, sp.train, k=16), batch_size=8, shuffle=True)
    t0 = time.perf_counter(); n = 0
    for i, b in enumerate(dl):
        n += b["video"].shape[0]
        if i == 20: break
    dt = time.perf_counter() - t0
    print(f"ShardedLoader (CPU): {n / dt:.0f} windows/s of 16 TRs ({n * 16 / dt:.0f} TRs/s)")
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
    size = sum(p.stat().st_size for f in [al.cache, *stream_folders(al.cache).values()] for p in f.iterdir())
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


def du(root:Path)->int:
    "Bytes of every file below `root`."
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def timed(cmd:list, env:dict)->dict:
    "Run `cmd` under /usr/bin/time -v: wall seconds and peak RSS (GB), from its report."
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode: sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1]) * 1024 / 1e9
    return dict(wall_s=round(wall, 1), peak_rss_gb=round(rss, 3))


def bold_stream(folder:str, how:str, where:str|None):
    "Build the float16 BOLD arrays of a study folder's scans one way (`once` or `twice`) and write them to a cache folder."
    from giblet.data.fmri import find_niftis, load_nifti, shared_mask
    from giblet.data.subjects import MaskRule, OnePassBold, SubjectBold
    nii = find_niftis(Path(folder) / "sherlock_nii")
    n = min(load_nifti(p).shape[3] for p in nii)
    root = Path(tempfile.mkdtemp(dir=where))
    t0 = time.perf_counter()
    bold = OnePassBold([(nii, 0, n)], MaskRule(nii), workdir=root) if how == "once" else SubjectBold([(nii, 0, n)], shared_mask(nii))
    t1 = time.perf_counter()
    center, scale, codes = _encode_fmri(bold, show_progress=False)
    save_arrays(root / "fmri", dict(fmri=codes, fmri_center=center, fmri_scale=scale))
    if how == "once": bold.close()
    t2 = time.perf_counter()
    print(json.dumps(dict(how=how, mask_s=round(t1 - t0, 1), write_s=round(t2 - t1, 1), total_s=round(t2 - t0, 1),
                          subjects=len(nii), trs=n, voxels=bold.shape[2], blake2b=file_checksum(root / "fmri" / "fmri.npy"))), flush=True)
    shutil.rmtree(root)


def bold_compare(folder:str, repeat:int, where:str|None):
    "Read once against read twice, alternating, each in a fresh process; a table."
    rows = []
    for k in range(repeat):
        for how in ("once", "twice"):
            r = subprocess.run(["/usr/bin/time", "-v", sys.executable, __file__, "--bold", folder, "--how", how]
                               + (["--dir", where] if where else []), capture_output=True, text=True)
            if r.returncode: sys.exit(r.stderr[-3000:])
            fig = json.loads(r.stdout.strip().splitlines()[-1])
            fig["peak_rss_gb"] = round(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)[1]) * 1024 / 1e9, 3)
            fig["load_1min"] = round(os.getloadavg()[0], 1)
            rows.append(fig); print(json.dumps(fig), flush=True)
    assert len({r["blake2b"] for r in rows}) == 1, "the two ways wrote different bytes"
    print("| scans read | mask (s) | scale + write (s) | total (s) | peak RSS | load average after |\n|---|---|---|---|---|---|")
    for r in rows: print(f"| {r['how']} | {r['mask_s']:.0f} | {r['write_s']:.0f} | {r['total_s']:.0f} | {r['peak_rss_gb']:.2f} GB | {r['load_1min']} |")


def full_scale(study:str, cache:str, entry:str, size:tuple, preset:str="sherlock"):
    "First build, cache hit, and a frame-size change of a study's caches, each a fresh process; a table of figures."
    cache = Path(cache); env = dict(os.environ, GIBLET_CACHE=str(cache), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    def cmd(w_h):
        if entry == "giblet-cache":     # the preset's own overrides kept, the frame size changed
            from giblet.training.config import PRESET_OVERRIDES
            over = dict(PRESET_OVERRIDES.get(preset, {}), frame_width=w_h[0], frame_height=w_h[1]) if w_h else None
            return [shutil.which("giblet-cache"), "--data-dir", study, "--preset", preset,
                    *(["--config", json.dumps(dict(model_overrides=over))] if over else [])]
        params = "None" if w_h is None else f"FeatureParams(size={tuple(w_h)})"
        return [sys.executable, "-c", "from giblet.alignment.sync import FeatureParams; from giblet.dataset import load_study; "
                f"al = load_study({study!r}, params={params}); print(al.n_subjects, al.n_trs, al.n_voxels, al.cache)"]
    rows = []
    for step, w_h in [("first build", None), ("second run (cache hit)", None), (f"frame size {size[0]}x{size[1]} only", size)]:
        before = {p.name for p in cache.iterdir()} if cache.is_dir() else set()
        fig = timed(cmd(w_h), env)
        added = sorted(p.name for p in cache.iterdir() if p.name not in before)
        rows.append(dict(step=step, **fig, added=[a.split("-")[0] if "-" in a else "study" for a in added],
                         added_gb=round(sum(du(cache / a) for a in added) / 1e9, 2), cache_gb=round(du(cache) / 1e9, 2)))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{study} via {entry}{f' --preset {preset}' if entry == 'giblet-cache' else ''}, GIBLET_CACHE={cache}\n")
    print("| step | wall time | peak RSS | cache folders added | added on disk | cache on disk |\n|---|---|---|---|---|---|")
    for r in rows: print(f"| {r['step']} | {r['wall_s']:.0f} s | {r['peak_rss_gb']:.2f} GB | {', '.join(r['added']) or 'none'} | "
                         f"{r['added_gb']:.2f} GB | {r['cache_gb']:.2f} GB |")
    for f in sorted(cache.iterdir()): print(f"  {f.name:32s} {du(f) / 1e9:6.2f} GB" if f.is_dir() else f"  {f.name}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", type=int, default=17)
    ap.add_argument("--voxels", type=int, default=85_000)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--study", default=None)
    ap.add_argument("--subsets", default=None)
    ap.add_argument("--full", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--entry", default="load_study", choices=["load_study", "giblet-cache"])
    ap.add_argument("--size", default="128,72")
    ap.add_argument("--preset", default="sherlock")
    ap.add_argument("--bold", default=None)
    ap.add_argument("--how", default=None, choices=["once", "twice"])
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    if a.bold and a.how: bold_stream(a.bold, a.how, a.dir)
    elif a.bold: bold_compare(a.bold, a.repeat, a.dir)
    elif a.full: full_scale(a.full, a.cache, a.entry, tuple(int(x) for x in a.size.split(",")), a.preset)
    elif a.study and a.subsets: build_subsets(a.study, [int(k) for k in a.subsets.split(",")], a.dir)
    elif a.study: build_study(a.study, a.dir)
    else: main(a.subjects, a.voxels, a.dir)
