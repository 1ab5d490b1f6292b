"""End-to-end lesion studies on a synthetic study with planted visual / auditory / language ROIs, on a tiny model trained here."""
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from giblet.data.synthetic import load_truth
from giblet.lesion import giblet_lesion, lesion_data, lesion_effects, load_run, render
from giblet.regions import atlas_regions, mask_region, parse_regions, sphere_region, synthetic_regions
from giblet.training.trainer import Trainer, TrainConfig, prepare_data

# Sherlock's length and subject count on a coarse grid and a small, slow film: the tiny model learns the planted mapping
# (rather than memorising the training block) and the validation block holds 13 bootstrap blocks of 20 s
SYNTHETIC = dict(n_subjects=17, n_trs=900, shape=[14, 17, 14], size=[64, 36], fps=10, seed=0)
TRAIN = dict(preset="tiny", epochs=20, batch_size=8, lr=3e-3, stride=4, patience=0, device="cpu", progress=False)
ROIS = ("visual", "auditory", "language")
TARGET = dict(visual="video", auditory="audio", language="text")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A tiny model trained on the synthetic study with the Trainer (checkpoints written), and its data."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and immune to busy-waiting on a shared machine
    root = tmp_path_factory.mktemp("lesion")
    cfg = TrainConfig(synthetic=SYNTHETIC, cache_dir=str(root / "cache"), **TRAIN)
    t0 = time.perf_counter()
    data = prepare_data(cfg)
    t1 = time.perf_counter()
    trainer = Trainer(data, cfg, out_dir=root / "run")
    trainer.fit()
    print(f"\nsynthetic study + features {t1 - t0:.1f} s, training {time.perf_counter() - t1:.1f} s")
    yield dict(model=trainer.model.eval(), data=data, root=root, checkpoint=root / "run" / "checkpoints" / "last.pt")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def effects(run):
    "Lesion and keep-only effect tables of the planted ROIs over the validation block, from measured fMRI and from the stimulus."
    data = lesion_data(run["data"], "val")
    regions = synthetic_regions(run["data"].data_dir, data.mask, ROIS)
    out = {(mode, source): lesion_effects(run["model"], data, regions, mode=mode, source=source)
           for mode in ("lesion", "keep") for source in ("fmri", "stimulus")}
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        for k, t in out.items():
            print(k, t[t.metric == "nmse"][["region", "modality", "intact", "value", "control", "effect", "specific",
                                            "specific_lo", "specific_hi"]].round(4).to_string(index=False), sep="\n")
    return out


def _row(table, region, modality, metric="nmse"):
    t = table[(table.region == region) & (table.modality == modality) & (table.metric == metric)]
    assert len(t) == 1, (region, modality, metric)
    return t.iloc[0]


def test_regions_match_the_planted_truth(run):
    "Synthetic ROIs, the same labels read from an atlas file on another grid, a sphere, and a clear error off the brain."
    rd = run["data"]
    mask = rd.aligned.mask
    truth = load_truth(rd.data_dir)
    regions = synthetic_regions(truth, mask, ROIS)
    inside = np.asarray(truth["brain_mask"]) != 0
    units = np.asarray(mask.dataobj) != 0
    roi_vol = np.zeros(inside.shape, np.int16); roi_vol[inside] = truth["roi"]
    for label, r in enumerate(regions, start=1):
        np.testing.assert_array_equal(r.mask, roi_vol[units] == label)
    # the same atlas on a grid of half-size voxels (nilearn resamples it back, nearest neighbour)
    aff = np.asarray(truth["affine"], np.float64)
    fine_aff = aff.copy(); fine_aff[:3, :3] /= 2; fine_aff[:3, 3] -= np.diag(fine_aff)[:3] / 2
    fine = np.repeat(np.repeat(np.repeat(roi_vol, 2, 0), 2, 1), 2, 2)
    path = run["root"] / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(fine, fine_aff), path)
    for a, r in zip(atlas_regions(path, mask, ["visual", 2, "3"], names=list(truth["roi_names"])), regions):
        assert (a.mask == r.mask).mean() > 0.99, a
    # a sphere at the visual ROI's seed lies mostly inside it
    v1 = sphere_region((0.0, -92.0, 4.0), 15.0, mask, "V1")
    assert v1.size > 0 and (v1.mask & regions[0].mask).sum() > 0.6 * v1.size
    outside = np.zeros(units.shape, np.uint8); outside[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(outside, np.asarray(mask.affine)), run["root"] / "corner.nii.gz")
    with pytest.raises(ValueError, match="does not overlap"):
        mask_region(run["root"] / "corner.nii.gz", mask)
    with pytest.raises(ValueError, match="unknown kind"):
        parse_regions("blob:1", mask)


@pytest.mark.parametrize("source", ["fmri", "stimulus"])
def test_lesions_hit_their_modality(effects, source):
    """Decoding measured fMRI, and decoding the brain layer predicted from the stimulus: visual ROI -> video (>= 3x audio),
    auditory -> audio (>= 3x video), language -> text most; each beats its random-region control, CI excluding 0."""
    t = effects["lesion", source]
    v, a = _row(t, "visual", "video").effect, _row(t, "visual", "audio").effect
    assert v > 0 and v >= 3 * a, (v, a)
    v, a = _row(t, "auditory", "video").effect, _row(t, "auditory", "audio").effect
    assert a > 0 and a >= 3 * v, (a, v)
    lang = {m: _row(t, "language", m).effect for m in ("video", "audio", "text")}
    assert lang["text"] > max(lang["video"], lang["audio"]), lang
    for roi, modality in TARGET.items():
        r = _row(t, roi, modality)
        assert r.specific > 0 and r.specific_lo > 0, r  # more than a random region of the same size, CI excluding 0


@pytest.mark.parametrize("source", ["fmri", "stimulus"])
def test_keep_only_visual_carries_the_video(effects, source):
    "Keeping only the visual ROI reconstructs video better than keeping only the auditory ROI, and each ROI beats random units."
    t = effects["keep", source]
    assert set(t.source) == {source}
    assert _row(t, "visual", "video").value < _row(t, "auditory", "video").value
    for roi, modality in TARGET.items():
        r = _row(t, roi, modality)
        assert r.specific > 0 and r.specific_lo > 0, r


def test_render_writes_viewable_media(run, tmp_path):
    "An MP4 with every frame of each TR, one WAV per version, a text timeline per TR."
    from scipy.io import wavfile
    from giblet.data.video import video_info, video_to_frames
    rd = run["data"]
    data = lesion_data(rd, "val")
    region = synthetic_regions(rd.data_dir, data.mask, ["visual"])[0]
    r = render(run["model"], data, region, tmp_path, n_trs=8, n_iter=8)
    info = video_info(r.video)
    F = rd.aligned.video.shape[1]
    assert info.n_frames == 8 * F and abs(info.duration - 8 * rd.aligned.tr) < 0.05
    frames = video_to_frames(r.video, tr=rd.aligned.tr, size=(info.width, info.height), frame_skip=1, max_trs=1)
    assert frames.std() > 5  # not blank: three panels and captions
    assert sorted(r.audio) == ["intact", "lesion", "original"]
    for path in r.audio.values():
        sr, wave = wavfile.read(path)
        assert sr == 16000 and len(wave) == int(8 * rd.aligned.tr * sr) and np.abs(wave).max() > 0
    tl = pd.read_csv(r.timeline)
    assert len(tl) == 8 and list(tl.tr) == list(data.trs[:8])
    assert tl["original"].fillna("").tolist() == [rd.aligned.texts[i] for i in data.trs[:8]]
    assert r.markdown.read_text().startswith("| tr | time_s | original | intact | lesion: visual |")


def test_cli_from_checkpoint(run, tmp_path):
    "giblet-lesion on the run's checkpoint rebuilds its data and writes the table, the figure and the media."
    model, rd = load_run(run["checkpoint"])
    assert rd.aligned.n_voxels == model.config.n_voxels
    np.testing.assert_array_equal(rd.split.val, run["data"].split.val)
    table = giblet_lesion(str(run["checkpoint"]), regions="synthetic:visual;sphere:54,-22,8,9:A1r", out=str(tmp_path),
                          n_boot=200, render_trs=4)
    assert set(table.region) == {"visual", "A1r"}
    saved = pd.read_csv(tmp_path / "effects.csv")
    assert len(saved) == len(table) and (tmp_path / "effects.png").stat().st_size > 0
    for name in ("visual", "A1r"):
        assert (tmp_path / name / f"{name}_lesion.mp4").is_file() and (tmp_path / name / f"{name}_lesion_text.csv").is_file()
    import subprocess, sys
    cli = subprocess.run([sys.executable, "-m", "giblet.lesion", "--help"], capture_output=True, text=True, check=True)
    assert "--regions" in cli.stdout and "checkpoint" in cli.stdout


def test_papermill_notebook(run, tmp_path, repo_root, monkeypatch):
    "The lesion tutorial runs under papermill with its parameters and writes the table, the figure and the media."
    import papermill as pm
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: tiny ops, no busy-waiting threads
    pm.execute_notebook(str(repo_root / "nbs" / "tutorials" / "lesion.ipynb"), str(tmp_path / "lesion.ipynb"),
                        parameters=dict(checkpoint=str(run["checkpoint"]), regions="synthetic:auditory", out_dir=str(tmp_path / "out"),
                                        render_trs=4, n_boot=200, source="fmri"), cwd=str(tmp_path), progress_bar=False)
    table = pd.read_csv(tmp_path / "out" / "effects.csv")
    assert set(table.region) == {"auditory"} and set(table.source) == {"fmri"}
    assert (tmp_path / "out" / "effects.png").is_file() and (tmp_path / "out" / "auditory" / "auditory_lesion.mp4").is_file()
