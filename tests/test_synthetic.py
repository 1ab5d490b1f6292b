"""End-to-end checks of the synthetic Sherlock-layout generator: files, formats, determinism and the planted truth."""
import av
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import RidgeCV

from giblet.alignment.hrf import convolve_hrf
from giblet.synthetic import (FACTOR_MODALITY, FACTOR_NAMES, PRESETS, ROI_MODALITY, ROI_NAMES, load_truth,
                                   make_dataset, plant_bold)
from giblet.data.audio import audio_to_mel
from giblet.data.embeddings import HashingEmbedder, embed_trs
from giblet.data.text import annotations_to_trs, load_annotations
from giblet.data.video import frames_to_video, psnr, video_info, video_to_frames

N_SUBJECTS, N_TRS, TR = 3, 300, 1.5


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    "The default study (3 subjects x 300 TRs), written once for this module."
    return make_dataset(tmp_path_factory.mktemp("synthetic") / "sherlock", seed=0)


@pytest.fixture(scope="module")
def truth(study):
    return load_truth(study.truth)


def _zscored(path, mask):
    x = np.asarray(nib.load(path).dataobj)[mask > 0].T.astype(np.float64)
    return (x - x.mean(0)) / x.std(0)


def _r(a, b):
    "Column-wise Pearson r."
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def test_layout(study):
    root = study.root
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["annotations.xlsx"] + [f"sherlock_nii/sherlock_movie_s{i}.nii.gz" for i in (1, 2, 3)] + \
                    ["stimuli_Sherlock.m4v", "truth.npz"]
    assert study.film == root / "stimuli_Sherlock.m4v" and study.annotations == root / "annotations.xlsx"
    assert study.nii == [root / "sherlock_nii" / f"sherlock_movie_s{i}.nii.gz" for i in (1, 2, 3)]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in root.rglob("*") if p.is_file())   # readable by others


def test_truth_contract(truth):
    assert set(truth) == {"bold", "brain_mask", "roi", "roi_names", "factors", "factor_names", "factor_modality",
                          "factor_roi", "amplitude", "tr", "affine"}
    assert truth["factor_roi"].tolist() == [{"video": 1, "audio": 2, "text": 3}[m] for m in FACTOR_MODALITY]
    mask = truth["brain_mask"]
    n_vox = int(mask.sum())
    assert mask.dtype == np.uint8 and mask.shape == (20, 24, 20) and set(np.unique(mask)) == {0, 1}
    assert truth["bold"].dtype == np.float32 and truth["bold"].shape == (N_TRS, n_vox)
    assert truth["roi"].dtype == np.int8 and truth["roi"].shape == (n_vox,) and set(np.unique(truth["roi"])) == {0, 1, 2, 3}
    assert truth["roi_names"] == ROI_NAMES == ("none", "visual", "auditory", "language")
    assert truth["factors"].dtype == np.float32 and truth["factors"].shape == (N_TRS, len(FACTOR_NAMES))
    assert truth["factor_names"] == FACTOR_NAMES and truth["factor_modality"] == FACTOR_MODALITY
    assert truth["tr"] == TR and truth["affine"].shape == (4, 4)
    assert np.all(truth["bold"][:, truth["roi"] == 0] == 0)
    sd = truth["bold"][:, truth["roi"] > 0].std(0)
    assert sd.min() > 0.49 and sd.max() <= 1.0 + 1e-5          # amplitude 0.5 (blob edge) .. 1 (centre)


def test_nifti_format(study, truth):
    mask = truth["brain_mask"] > 0
    offsets = []
    for path in study.nii:
        img = nib.load(path)
        assert img.get_data_dtype() == np.int16 and img.shape == (20, 24, 20, N_TRS)
        assert img.header["pixdim"][4] == TR and img.header.get_xyzt_units() == ("mm", "sec")
        np.testing.assert_allclose(img.affine, truth["affine"])
        data = np.asarray(img.dataobj)
        assert data.dtype == np.int16 and not data[~mask].any()     # zero outside the brain
        inside = data[mask].astype(np.float64)
        assert 800 < inside.mean() < 1250 and inside.std(axis=1).min() > 0
        offsets.append(inside.mean())
    assert len(set(np.round(offsets))) == N_SUBJECTS              # each subject has its own offset


def test_film(study):
    info = video_info(study.film)
    assert (info.width, info.height, info.fps, info.codec) == (160, 90, 25.0, "h264") and info.has_audio
    assert info.duration >= N_TRS * TR + 3                          # a few seconds longer than the scan
    with av.open(str(study.film)) as c:
        assert c.format.name.startswith("mov,mp4")
        assert c.streams.audio[0].codec_context.name == "aac" and c.streams.audio[0].rate == 16000


def test_annotation_quirks(study):
    raw = pd.read_excel(study.annotations, engine="openpyxl")
    for col in ("Start Time (s) ", "End Time (s) ", "Scene Details - A Level ", "Name - All", "Location"):
        assert col in raw.columns                                   # exact names, trailing spaces included
    assert raw.duplicated().any()                                   # exact duplicate rows
    s, e = raw["Start Time (s) "].to_numpy(), raw["End Time (s) "].to_numpy()
    assert (s[1:] > e[:-1] + 0.4).any() and (e > s).all()           # gaps between segments
    assert raw["Name - All"].isna().any()                           # blank cells
    df = load_annotations(study.annotations, film_duration=video_info(study.film).duration)
    assert len(df) == len(raw.drop_duplicates()) and df["end"].max() > N_TRS * TR


def test_deterministic(tmp_path, monkeypatch):
    "Same seed, same data: truth, NIfTI data, annotations, and the exact frames and sound handed to the encoder."
    import giblet.synthetic as synthetic
    sent = []

    def capture(frames, path, fps, audio=None, sample_rate=None):
        frames = np.stack(list(frames))
        sent.append((frames, audio))
        return frames_to_video(frames, path, fps, audio=audio, sample_rate=sample_rate)
    monkeypatch.setattr(synthetic, "frames_to_video", capture)
    kw = dict(n_subjects=2, n_trs=30, seed=3)
    a, b = make_dataset(tmp_path / "a", **kw), make_dataset(tmp_path / "b", **kw)
    ta, tb = load_truth(a), load_truth(b)
    for k in ta: np.testing.assert_array_equal(ta[k], tb[k])
    for pa, pb in zip(a.nii, b.nii):
        np.testing.assert_array_equal(np.asarray(nib.load(pa).dataobj), np.asarray(nib.load(pb).dataobj))
    pd.testing.assert_frame_equal(pd.read_excel(a.annotations), pd.read_excel(b.annotations))
    np.testing.assert_array_equal(sent[0][0], sent[1][0])
    np.testing.assert_array_equal(sent[0][1], sent[1][1])
    # multithreaded x264 may take different (equally good) decisions from run to run: compare the decoded pictures
    assert psnr(video_to_frames(a.film, max_trs=30), video_to_frames(b.film, max_trs=30)) > 40
    c = load_truth(make_dataset(tmp_path / "c", n_subjects=1, n_trs=30, seed=4))
    assert not np.array_equal(ta["factors"], c["factors"]) and not np.array_equal(ta["bold"], c["bold"])


def test_overwrite_and_bad_input(tmp_path, study):
    with pytest.raises(FileExistsError, match="overwrite=True"): make_dataset(study.root, n_trs=40)
    root = tmp_path / "s"
    make_dataset(root, n_subjects=3, n_trs=30, seed=1)
    lay = make_dataset(root, n_subjects=2, n_trs=30, seed=1, overwrite=True)
    assert sorted(p.name for p in (root / "sherlock_nii").iterdir()) == [p.name for p in lay.nii]   # no stale subject
    assert not [p for p in root.rglob(".*")]                         # no temporary files left behind
    with pytest.raises(ValueError, match="unknown preset"): make_dataset(tmp_path / "x", preset="huge")
    with pytest.raises(ValueError, match="n_trs"): make_dataset(tmp_path / "y", n_trs=5)
    assert PRESETS["sherlock"]["n_trs"] == 946 and PRESETS["sherlock"]["shape"] == (61, 73, 61)


def test_truth_is_recoverable_from_bold(study, truth):
    "Noisy BOLD of each ROI follows that ROI's planted signal; voxels outside the ROIs do not."
    mask, roi = truth["brain_mask"], truth["roi"]
    avg = np.mean([_zscored(p, mask) for p in study.nii], axis=0)
    none = np.flatnonzero(roi == 0)
    for label in (1, 2, 3):
        inside = np.flatnonzero(roi == label)
        r_in = _r(avg[:, inside], truth["bold"][:, inside])                 # each voxel against its own truth
        partner = np.random.default_rng(label).choice(inside, len(none))  # a "none" voxel against an ROI voxel's truth
        r_out = _r(avg[:, none], truth["bold"][:, partner])
        assert r_in.mean() > 0.6 and abs(r_out.mean()) < 0.05, (ROI_NAMES[label], r_in.mean(), r_out.mean())
    r_each = _r(_zscored(study.nii[0], mask)[:, roi > 0], truth["bold"][:, roi > 0])
    assert 0.4 < r_each.mean() < 0.75                               # one subject: realistic, not overwhelming noise


def test_truth_is_hrf_convolved_factors(truth):
    "Each ROI's truth is an affine function of its own modality's HRF-convolved factors, and of no other's."
    conv = convolve_hrf(truth["factors"].astype(np.float64), TR)
    for label, modality in ROI_MODALITY.items():
        Y = truth["bold"][:, truth["roi"] == label]
        for mod in ("video", "audio", "text"):
            X = np.c_[conv[:, [j for j, m in enumerate(truth["factor_modality"]) if m == mod]], np.ones(N_TRS)]
            res = Y - X @ np.linalg.lstsq(X, Y, rcond=None)[0]
            r2 = 1 - (res ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum()
            assert r2 > 0.9999 if mod == modality else r2 < 0.3, (ROI_NAMES[label], mod, r2)


def test_causal(truth):
    "An impulse moves nothing before it; in the data, each factor leads its ROI's response by 4.5-6 s."
    f = np.zeros((60, 2)); f[20, 0] = 1; f[35, 1] = 1
    b = plant_bold(f, np.array([[1.0, 0.0], [0.0, 1.0]]), np.ones(2), TR)
    assert np.ptp(b[:21, 0]) == 0 and np.ptp(b[:36, 1]) == 0
    assert (b[:, 0].argmax() - 20) * TR in (4.5, 6.0) and (b[:, 1].argmax() - 35) * TR in (4.5, 6.0)
    lags = np.arange(-6, 9)
    for label, modality in ROI_MODALITY.items():
        Y = truth["bold"][:, truth["roi"] == label]
        F = truth["factors"][:, [j for j, m in enumerate(truth["factor_modality"]) if m == modality]]
        r2 = []
        for L in lags:                                               # the ROI's truth at t against its factors at t - L
            x, y = F[max(0, -L):N_TRS - max(0, L)], Y[max(0, L):N_TRS - max(0, -L)]
            X = np.c_[x, np.ones(len(x))]
            res = y - X @ np.linalg.lstsq(X, y, rcond=None)[0]
            r2.append(1 - (res ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
        r2 = np.array(r2)
        assert lags[r2.argmax()] * TR in (4.5, 6.0) and r2.max() > r2[lags <= 0].max() + 0.4, (modality, r2.round(2))


def test_stimulus_carries_the_factors(study, truth):
    "giblet's readers recover each factor from the rendered stimulus (held-out linear read-out)."
    n_fit = 200
    frames = video_to_frames(study.film, tr=TR, max_trs=N_TRS).astype(np.float32)
    cells = frames.reshape(N_TRS, frames.shape[1], 3, 30, 4, 40, 3).mean(axis=(1, 3, 5)).reshape(N_TRS, -1)
    audio = audio_to_mel(study.film, tr=TR, n_mels=64, max_trs=N_TRS).mean(axis=2)      # (n_trs, n_mels) dB
    texts, has = annotations_to_trs(load_annotations(study.annotations), N_TRS, TR)
    text = embed_trs(texts, has, HashingEmbedder(dim=256))
    F = truth["factors"]
    for modality, X, floor in (("video", cells, 0.9), ("audio", audio, 0.9), ("text", text, 0.7)):
        X = (X - X[:n_fit].mean(0)) / (X[:n_fit].std(0) + 1e-6)
        cols = [j for j, m in enumerate(truth["factor_modality"]) if m == modality]
        pred = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(X[:n_fit], F[:n_fit, cols]).predict(X[n_fit:])
        r = _r(pred, F[n_fit:, cols])
        assert r.min() > floor, (modality, dict(zip([FACTOR_NAMES[j] for j in cols], np.round(r, 2))))


def test_bold_learnable_only_from_the_stimulus(study, truth):
    "Fit on the first 2/3 of the noisy subject-average BOLD: the true factors predict held-out truth; shifted ones do not."
    mask, roi = truth["brain_mask"], truth["roi"]
    Y = np.mean([_zscored(p, mask) for p in study.nii], axis=0)[:, roi > 0]
    T = truth["bold"][:, roi > 0]
    n_fit, test = 200, slice(214, N_TRS)                            # a 21 s gap between fit and test blocks
    for factors, lo, hi in ((truth["factors"], 0.85, 1.0), (np.roll(truth["factors"], 100, axis=0), -0.3, 0.3)):
        X = convolve_hrf(factors.astype(np.float64), TR)
        r = _r(RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(X[:n_fit], Y[:n_fit]).predict(X[test]), T[test])
        assert lo < r.mean() < hi, r.mean()


def test_two_runs_in_both_layouts(tmp_path):
    "Two runs: one NIfTI per subject and run, the same data in the Sherlock and the BIDS layout, parts with a clock restart."
    import json
    kw = dict(n_subjects=2, n_trs=60, n_runs=2, seed=2, shape=(10, 12, 10), size=(32, 18))
    a, b = make_dataset(tmp_path / "a", **kw), make_dataset(tmp_path / "b", layout="bids", **kw)
    assert [p.name for p in a.runs[1]["nii"]] == ["sherlock_movie_s1_run2.nii.gz", "sherlock_movie_s2_run2.nii.gz"]
    assert [p.relative_to(b.root).as_posix() for p in b.runs[1]["nii"]] == [
        f"sub-0{s}/func/sub-0{s}_task-movie_run-2_bold.nii.gz" for s in (1, 2)]
    for ra, rb in zip(a.runs, b.runs):
        assert {k: v for k, v in ra.items() if k != "nii"} == {k: v for k, v in rb.items() if k != "nii"}
        for pa, pb in zip(ra["nii"], rb["nii"]):
            np.testing.assert_array_equal(np.asarray(nib.load(pa).dataobj), np.asarray(nib.load(pb).dataobj))
    (r1, r2), t = a.runs, load_truth(a)
    assert (r1["scan_offset"], r2["scan_offset"], r1["film_stop"]) == (1, -2, r2["film_start"])
    n1, n2 = (nib.load(r["nii"][0]).shape[3] for r in a.runs)
    assert n1 + n2 == 60 and t["bold"].shape[0] == 60 and t["run"].tolist() == [0] * n1 + [1] * n2
    assert t["volume"].tolist() == list(range(n1)) + list(range(n2))
    assert not t["factors"][0].any() and t["factors"][n1].any()       # run 1's volume 0 is before its film; run 2's is not
    assert video_info(a.film).duration >= r2["film_stop"]
    raw = pd.read_excel(a.annotations)
    back = np.flatnonzero(np.diff(raw["Start Time (s) "].to_numpy()) < 0)
    assert len(back) == 1 and (np.diff(raw["Start TR"]) >= 0).all() and (np.diff(raw["Segment Number"]) >= 0).all()
    part2 = raw.iloc[back[0] + 1:]
    assert part2["Start Time (s) "].min() == 0 and part2["Start TR"].min() == int(r2["film_start"] // TR) + 1
    side = json.loads((b.runs[0]["nii"][0].parent / "sub-01_task-movie_run-1_bold.json").read_text())
    assert side["RepetitionTime"] == TR
    ev = pd.read_csv(b.runs[1]["nii"][1].parent / "sub-02_task-movie_run-2_events.tsv", sep="\t")
    assert ev[["onset", "duration", "stim_file", "film_start"]].values.tolist() == [
        [-2 * TR, r2["film_stop"] - r2["film_start"], "film.m4v", r2["film_start"]]]
    assert (b.root / "participants.tsv").read_text().split() == ["participant_id", "sub-01", "sub-02"]
    lay = make_dataset(b.root, **{**kw, "n_subjects": 1}, layout="bids", overwrite=True)   # no stale subject left
    assert sorted(p.name for p in b.root.glob("sub-*/func/*")) == sorted(
        n for p in lay.runs[0]["nii"] + lay.runs[1]["nii"] for n in
        (p.name, p.name.replace("_bold.nii.gz", "_bold.json"), p.name.replace("_bold.nii.gz", "_events.tsv")))
    with pytest.raises(ValueError, match="layout"): make_dataset(tmp_path / "z", layout="bdis")


# ---- nonlinear factors and the realistic preset ----

NL = dict(n_subjects=1, n_trs=300, shape=(10, 12, 10), size=(64, 36), fps=10, seed=0, factors="nonlinear")
NEW = ("texture", "motion_dir", "glide_dir", "av_product")


@pytest.fixture(scope="module")
def nl_study(tmp_path_factory):
    "A one-subject study with the nonlinear factors, its film read back as the trainer reads it (64x36 frames, 32 mels)."
    lay = make_dataset(tmp_path_factory.mktemp("nonlinear") / "s", **NL)
    n = NL["n_trs"]
    video = video_to_frames(lay.film, tr=TR, size=(64, 36), frame_skip=1, max_trs=n)
    mel = audio_to_mel(lay.film, tr=TR, n_mels=32, max_trs=n)
    texts, has = annotations_to_trs(load_annotations(lay.annotations), n, TR)
    return lay, load_truth(lay), video, mel, embed_trs(texts, has, HashingEmbedder(dim=64))


def _held_out_r2(X, y, n_fit):
    "R² on the TRs after a 20-TR gap, of a RidgeCV fitted on the first n_fit TRs."
    X = (X - X[:n_fit].mean(0)) / (X[:n_fit].std(0) + 1e-6)
    test = slice(n_fit + 20, len(X))
    pred = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit(X[:n_fit], y[:n_fit]).predict(X[test])
    return 1 - ((y[test] - pred) ** 2).sum() / ((y[test] - y[test].mean()) ** 2).sum()


def test_nonlinear_truth(nl_study):
    "Linear factors and planted truth unchanged by the opt-in; each new factor drives only its own ROI."
    lay, t, *_ = nl_study
    base = load_truth(make_dataset(lay.root.parent / "linear", **{**NL, "factors": "linear"}))
    np.testing.assert_array_equal(t["factors"][:, :len(FACTOR_NAMES)], base["factors"])
    linear = np.isin(base["roi"], (1, 2, 3))
    np.testing.assert_array_equal(t["roi"][linear], base["roi"][linear])       # the linear ROIs are grown first
    np.testing.assert_array_equal(t["bold"][:, linear], base["bold"][:, linear])
    assert t["factor_names"] == FACTOR_NAMES + NEW and t["roi_names"] == ROI_NAMES + NEW
    conv = convolve_hrf(t["factors"].astype(np.float64), TR)
    for k, name in enumerate(t["factor_names"]):
        label = t["factor_roi"][k]
        assert t["roi_names"][label] == (name if name in NEW else {"video": "visual", "audio": "auditory", "text": "language"}[
            t["factor_modality"][k]])
        if name in NEW:
            Y = t["bold"][:, t["roi"] == label]
            assert Y.shape[1] >= 4 and np.all([_r(Y[:, :1], Y[:, j:j + 1])[0] > 0.9999 for j in range(Y.shape[1])])
            assert abs(_r(Y[:, :1], conv[:, k:k + 1])[0]) > 0.9999, name       # the HRF-convolved factor, nothing else


def test_cheap_features_miss_the_nonlinear_factors(nl_study):
    "The ridge baseline's cheap per-TR features predict each linear factor on held-out TRs, and none of the new ones."
    from giblet.metrics import stimulus_features
    lay, t, video, mel, text = nl_study
    for every in (1, 4):                                                    # all 15 frames of a TR, or 4 (the tiny model's)
        X = stimulus_features(video=np.ascontiguousarray(video[:, ::every]), audio=mel, text=text)
        r2 = {name: _held_out_r2(X, t["factors"][:, k], 200) for k, name in enumerate(t["factor_names"])}
        for name in ("brightness", "red_left", "blue_right", "tone_low", "tone_high", "voice"):
            assert r2[name] > 0.7, (every, name, r2)
        for name in NEW: assert r2[name] < 0.1, (every, name, r2)


def test_nonlinear_factors_are_in_the_film(nl_study):
    "Each new factor is read from the decoded film by a rule that looks at order or pattern (no fitting)."
    lay, t, video, mel, text = nl_study
    F = dict(zip(t["factor_names"], t["factors"].T))
    g = video.astype(np.float32).mean(-1)                                   # (n_trs, frames, 36, 64) grey
    patch = g[:, :, 1:13, 49:61]                                            # the grating
    vertical = np.abs(np.diff(patch, axis=3)).mean((1, 2, 3)) > np.abs(np.diff(patch, axis=2)).mean((1, 2, 3))
    assert (np.where(vertical, 1, -1) == F["texture"]).mean() > 0.97
    bar = np.clip(g[:, :, 24:34, 3:29] - 110, 0, None).sum(2)               # (n_trs, frames, 26): the bar's strip
    step = (np.diff(bar.argmax(2), axis=1) + 13) % 26 - 13                  # the bar's move between frames (it wraps)
    on = F["motion_dir"] != 0
    assert (np.sign(np.median(step, axis=1))[on] == F["motion_dir"][on]).mean() > 0.97
    seen = bar.sum(2) > 50                                                  # frames that show the bar
    assert seen[on].mean() > 0.95 and seen[~on].mean() < 0.05              # the bar only where planted (discs may cross)
    bands = 10 ** (mel[:, 24:32] / 10)                                      # power in the mel bands of the glide's range
    centroid = (bands * np.arange(8)[None, :, None]).sum(1) / bands.sum(1)  # (n_trs, mel frames)
    on = F["glide_dir"] != 0
    slope = np.sign(centroid[:, 40:56].mean(1) - centroid[:, 8:24].mean(1))
    assert (slope[on] == F["glide_dir"][on]).mean() > 0.97
    box = video[:, :, 3:10, 28:33].astype(np.float32)
    flash = (box[..., 0] - box[..., 2]).mean((1, 2, 3)) > 95               # yellow: much red, little blue
    buzz = mel[:, 16:19].mean((1, 2))
    buzz = buzz > (buzz.max() + buzz.min()) / 2
    product = 4 * (flash - flash.mean()) * (buzz - buzz.mean())
    assert _r(product[:, None], F["av_product"][:, None])[0] > 0.95


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    "The realistic preset at a third of its length (the full 946 TRs is timed in the benchmark)."
    return make_dataset(tmp_path_factory.mktemp("realistic") / "r", preset="realistic", n_trs=320, n_subjects=6)


def test_realistic_preset(realistic):
    "z-scored float volumes per run; single-subject r with the planted signal 0.2-0.6 in the ROIs, low elsewhere."
    t = load_truth(realistic)
    p = PRESETS["realistic"]
    assert (p["n_trs"], p["size"], p["fps"], p["shape"], p["factors"], p["zscore"]) == (946, (64, 36), 10, (14, 17, 14), "nonlinear", True)
    assert 10 <= p["n_subjects"] <= 17 and p["noise_ar"] >= 0.8
    mask, roi = t["brain_mask"] > 0, t["roi"]
    r_in, r_out = [], []
    for path in realistic.nii:
        img = nib.load(path)
        assert img.get_data_dtype() == np.float32 and img.shape[:3] == (14, 17, 14)
        x = np.asarray(img.dataobj)[mask].T.astype(np.float64)
        np.testing.assert_allclose(x.mean(0), 0, atol=1e-4); np.testing.assert_allclose(x.std(0), 1, atol=1e-4)
        r = _r(x, t["bold"].astype(np.float64))
        r_in.append(r[roi > 0]); r_out.append(r[roi == 0])
    r_in, r_out = np.mean(r_in, 0), np.mean(r_out, 0)
    for label, name in enumerate(t["roi_names"][1:], 1):
        assert 0.2 < r_in[roi[roi > 0] == label].mean() < 0.6, (name, r_in[roi[roi > 0] == label].mean())
    assert 0 < r_out.mean() < 0.12                                          # weak voxels: some signal, little
    lag1 = np.mean([np.corrcoef(x[1:, j], x[:-1, j])[0, 1] for j in np.flatnonzero(roi == 0)])   # weak voxels: mostly noise
    assert lag1 > 0.6, lag1                                                 # strongly autocorrelated
    with pytest.raises(ValueError, match="factors"): make_dataset(realistic.root.parent / "x", factors="quadratic")


def test_explicit_values_beat_the_preset(tmp_path):
    "A value passed to make_dataset wins over the preset even where it equals the generator's own default (3 subjects)."
    lay = make_dataset(tmp_path / "s", preset="tiny", n_subjects=3, n_trs=40, size=(32, 18), fps=10)
    assert len(lay.nii) == 3, lay.nii
    assert load_truth(lay)["bold"].shape[0] == 40
