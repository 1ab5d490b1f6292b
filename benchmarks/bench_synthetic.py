"""Time the synthetic Sherlock-layout generator.

    python benchmarks/bench_synthetic.py                 # the default study (3 subjects x 300 TRs), stage by stage
    python benchmarks/bench_synthetic.py --sherlock      # + Sherlock-scale parts timed, and the full preset estimated
    python benchmarks/bench_synthetic.py --full DIR      # write the whole `sherlock` preset into DIR (minutes, ~10 GB)
    python benchmarks/bench_synthetic.py --layouts       # + the tiny study in 1 or 2 runs, Sherlock layout and BIDS,
                                                         #   resolved (spec file / pybids) and loaded through the cache
    python benchmarks/bench_synthetic.py --factors       # per factor, the R² of the ridge baseline's cheap features
                                                         #   (held out and in-sample), on the film of the `realistic` preset
    python benchmarks/bench_synthetic.py --realistic     # time make_dataset(preset="realistic") and measure its reliability

Prints wall and CPU seconds (CPU counts every thread of the process) and the peak resident memory.
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from giblet import synthetic as S
from giblet.data.video import frames_to_video


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class timer:
    "Context manager that prints the wall and CPU time of a block."
    def __init__(self, label): self.label = label
    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self
    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c
        print(f"{self.label:<48s} wall {self.wall:7.2f} s   cpu {self.cpu:7.2f} s   peak RSS {peak_mb():7.0f} MB", flush=True)


def film_parts(n_frames, size, fps, sample_rate, out, seed=0):
    "Render, synthesise and encode `n_frames` of film; returns the three timers."
    rng = np.random.default_rng(seed)
    tracks = {k: S._track(rng, n_frames, fps, *v) for k, v in S._TRACKS.items()}
    with timer(f"  render {n_frames} frames {size[0]}x{size[1]}") as t_render:
        for _ in S._frames(tracks, size, fps, rng): pass
    with timer(f"  sound {n_frames / fps:.0f} s at {sample_rate} Hz") as t_sound:
        audio = S._soundtrack(tracks, fps, sample_rate, rng)
    with timer("  render + encode (H.264 + AAC)") as t_enc:
        frames_to_video(S._frames(tracks, size, fps, rng), out, fps, audio=audio, sample_rate=sample_rate)
    return t_render, t_sound, t_enc


def subject_part(shape, n_trs, out, seed=0):
    "Plant the truth on a grid and write one subject; returns (plant timer, subject timer)."
    rng = np.random.default_rng(seed)
    with timer(f"  mask + ROIs + planted BOLD {shape} x {n_trs} TRs") as t_plant:
        mask, affine = S.brain_mask(shape)
        roi, amp = S.plant_rois(mask, affine)
        factors = rng.uniform(size=(n_trs, len(S.FACTOR_NAMES)))
        bold = S.plant_bold(factors, S._loadings(rng, mask, affine, roi), amp, 1.5)
    with timer(f"  one subject: noise + int16 NIfTI ({int(mask.sum())} voxels)") as t_sub:
        S._write_nii(out, S._subject_raw(rng, bold, mask, affine, 1.0, 0.5), mask, affine, 1.5)
    return t_plant, t_sub


def layouts():
    "The tiny preset written in both layouts with 1 and 2 runs, its spec resolved, and loaded (cache built, then hit)."
    from giblet.alignment.sync import FeatureParams
    from giblet.dataset import load_spec
    from giblet.study import resolve_study, write_spec
    params = FeatureParams(size=(80, 45), n_mels=32, text_dim=64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("tiny preset (2 subjects x 120 TRs, 14x17x14, 160x90 film), feature frames 80x45")
        for n_runs in (1, 2):
            for layout in ("sherlock", "bids"):
                root = tmp / f"{layout}{n_runs}"
                with timer(f"make_dataset(n_runs={n_runs}, layout={layout!r})"):
                    S.make_dataset(root, preset="tiny", n_runs=n_runs, layout=layout)
                if layout == "sherlock" and n_runs == 2: continue   # per-run files in the Sherlock layout need a spec file
                with timer(f"  resolve_study ({'pybids' if layout == 'bids' else 'discover'})"):
                    spec = resolve_study(root)
                source = write_spec(spec, root / "study.yaml")
                for what in ("build", "hit"):
                    with timer(f"  load_spec, cache {what}"):
                        al = load_spec(source, tmp / "cache", params, show_progress=False)
                print(f"  -> {al.n_subjects} subjects x {al.n_trs} TRs x {al.n_voxels} voxels in {len(set(al.run))} run(s)")


def cheap_r2(seeds=(0, 1, 2), n_trs=946):
    "Per factor: R² of a RidgeCV on stimulus_features (colour/motion grids, mel mean/std, text) at lag 0, in-sample and held out."
    import warnings
    from sklearn.linear_model import RidgeCV
    from giblet.data.audio import audio_to_mel
    from giblet.data.embeddings import HashingEmbedder, embed_trs
    from giblet.data.text import annotations_to_trs, load_annotations
    from giblet.data.video import video_to_frames
    from giblet.metrics import delay_features, stimulus_features
    p = S.PRESETS["realistic"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            with timer(f"film of the realistic preset, seed {seed} ({n_trs} TRs, 1 subject)"):
                lay = S.make_dataset(Path(tmp) / f"s{seed}", preset="realistic", n_subjects=1, n_trs=n_trs, seed=seed)
            t = S.load_truth(lay)
            video = video_to_frames(lay.film, tr=1.5, size=p["size"], frame_skip=1, max_trs=n_trs)
            mel = audio_to_mel(lay.film, tr=1.5, n_mels=32, max_trs=n_trs)
            texts, has = annotations_to_trs(load_annotations(lay.annotations), n_trs, 1.5)
            text = embed_trs(texts, has, HashingEmbedder(dim=64))
            z = lambda X: (X - X.mean(0)) / (X.std(0) + 1e-6)
            X = z(stimulus_features(video=video, audio=mel, text=text))
            X4 = z(stimulus_features(video=np.ascontiguousarray(video[:, ::4]), audio=mel, text=text))  # the tiny model's frames
            fir = delay_features(X, (0, 1, 2))                   # the factor's TR and the two before it
            n_fit = int(0.7 * n_trs)
            test = slice(n_fit + 22, n_trs)                       # a 33 s gap
            for k, name in enumerate(t["factor_names"]):
                y = t["factors"][:, k]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = [RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(X, y).score(X, y)]
                    out += [RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(Z[:n_fit], y[:n_fit]).score(Z[test], y[test])
                            for Z in (X, X4, fir)]
                rows.setdefault(name, []).append(out)
    print(f"\nR² of the cheap per-TR features ({X.shape[1]} columns) for each factor; mean over seeds {tuple(seeds)}")
    print(f"{'factor':<14s} {'in-sample':>10s} {'held out':>10s} {'4 frames/TR':>12s} {'3 lags':>8s}")
    for name, v in rows.items():
        m = np.mean(v, axis=0)
        print(f"{name:<14s} {m[0]:10.3f} {m[1]:10.3f} {m[2]:12.3f} {m[3]:8.3f}")


def realistic():
    "Time the full realistic preset and measure each subject's r with the planted signal, in the ROIs and elsewhere."
    import nibabel as nib
    with tempfile.TemporaryDirectory() as tmp:
        with timer("make_dataset(preset='realistic') (total)"):
            lay = S.make_dataset(Path(tmp) / "r", preset="realistic")
        t = S.load_truth(lay)
        mask, roi, bold = t["brain_mask"] > 0, t["roi"], t["bold"].astype(np.float64)
        b = (bold - bold.mean(0)) / bold.std(0)
        r = []
        for path in lay.nii:
            x = np.asarray(nib.load(path).dataobj)[mask].T.astype(np.float64)
            r.append((x * b).mean(0))                              # both z-scored: r per voxel
        r = np.array(r)
        loo = []                                                   # leave-one-out inter-subject r (no truth needed)
        for s in range(len(r)):
            x = np.asarray(nib.load(lay.nii[s]).dataobj)[mask].T.astype(np.float64)
            rest = np.mean([np.asarray(nib.load(p).dataobj)[mask].T for j, p in enumerate(lay.nii) if j != s], axis=0)
            rest = (rest - rest.mean(0)) / rest.std(0)
            loo.append((x * rest).mean(0))
        loo = np.array(loo)
        print(f"{len(lay.nii)} subjects x {bold.shape[0]} TRs, {mask.sum()} voxels")
        print(f"{'ROI':<12s} {'voxels':>6s} {'r(subject, truth)':>18s} {'leave-one-out ISC':>18s}")
        for label, name in enumerate(t["roi_names"]):
            v = roi == label
            print(f"{name:<12s} {v.sum():6d} {r[:, v].mean():18.3f} {loo[:, v].mean():18.3f}")
        x = np.asarray(nib.load(lay.nii[0]).dataobj)[mask].T
        lag1 = np.mean([np.corrcoef(x[1:, j], x[:-1, j])[0, 1] for j in np.flatnonzero(roi == 0)])
        print(f"lag-1 autocorrelation of the weak voxels (subject 1): {lag1:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sherlock", action="store_true", help="also time Sherlock-scale parts and estimate the full preset")
    ap.add_argument("--full", metavar="DIR", help="write the full sherlock preset into DIR")
    ap.add_argument("--layouts", action="store_true", help="time the tiny study in both layouts, 1 and 2 runs, and loading it")
    ap.add_argument("--factors", action="store_true", help="R² of the cheap features for each planted factor")
    ap.add_argument("--realistic", action="store_true", help="time the realistic preset and measure its reliability")
    ap.add_argument("--film-seconds", type=float, default=60.0, help="film seconds rendered for the Sherlock estimate")
    a = ap.parse_args()
    if a.layouts: return layouts()
    if a.factors: return cheap_r2()
    if a.realistic: return realistic()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("default study: make_dataset(root) = 3 subjects x 300 TRs, 20x24x20, 160x90 film of 454 s")
        with timer("make_dataset (total)"):
            S.make_dataset(tmp / "default")
        print("its parts:")
        film_parts(int(round(454 * 25)), (160, 90), 25, 16000, tmp / "f.mp4")
        subject_part((20, 24, 20), 300, tmp / "s.nii.gz")

        if a.sherlock:
            p = S.PRESETS["sherlock"]
            n_film = 946 * 1.5 + 4.0
            n_frames = int(round(a.film_seconds * 25))
            print(f"\nSherlock scale ({p['n_subjects']} subjects x {p['n_trs']} TRs, {p['shape']}, "
                  f"{p['size'][0]}x{p['size'][1]} film of {n_film:.0f} s): parts")
            t_render, t_sound, t_enc = film_parts(n_frames, p["size"], 25, p["sample_rate"], tmp / "F.mp4")
            t_plant, t_sub = subject_part(p["shape"], p["n_trs"], tmp / "S.nii.gz")
            scale = n_film / a.film_seconds
            film = t_enc.wall * scale
            total = t_plant.wall + p["n_subjects"] * t_sub.wall + film
            print(f"estimate for make_dataset(root, preset='sherlock'): film {film:.0f} s (x{scale:.1f} of the "
                  f"{a.film_seconds:.0f} s measured) + {p['n_subjects']} x {t_sub.wall:.1f} s subjects + "
                  f"{t_plant.wall:.1f} s truth = {total:.0f} s ({total / 60:.1f} min)")

    if a.full:
        with timer("make_dataset(preset='sherlock') (total)"):
            S.make_dataset(a.full, preset="sherlock", overwrite=True)


if __name__ == "__main__":
    sys.exit(main())
