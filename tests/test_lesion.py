"""End-to-end lesion studies on a synthetic study with planted visual / auditory / language ROIs, on a tiny model trained here:
effects against matched control blobs, a no-signal region that must show no effect, mean replacement, rendering and the CLI."""
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from giblet.synthetic import load_truth
from giblet.io import usual_mode
from giblet.lesion import lesion_data, lesion_effects
from giblet.lesion_run import lesion_main
from giblet.render import render
from giblet.regions import UnitGrid, atlas_regions, blob_region, mask_region, parse_regions, sphere_region, synthetic_regions
from giblet.training.checkpoints import load_run
from giblet.training.config import TrainConfig
from giblet.training.data import prepare_data
from giblet.training.trainer import Trainer
from conftest import QUICK_32

# Sherlock's length and subject count on a coarse grid and a small, slow film: the tiny model learns the planted mapping
# (rather than memorising the training block) and the validation block holds 13 bootstrap blocks of 20 s
SYNTHETIC = dict(n_subjects=17, n_trs=900, shape=[14, 17, 14], size=[64, 36], fps=10, seed=0)
TRAIN = dict(preset="tiny", epochs=20, batch_size=8, lr=3e-3, stride=4, patience=0, device="cpu", progress=False)
ROIS = ("visual", "auditory", "language")
TARGET = dict(visual="video", auditory="audio", language="text")
NULL = "no signal"  # the negative control: a contiguous blob of units with no planted signal
# the slow lane: a model trained to tell the planted regions apart, a papermill kernel, a stream-trained run (the lesion
# notebooks and the lesion tutorial run in the fast lane's nbdev_test); the study and its features are built in the session's
# background process while the tests before these run
pytestmark = [pytest.mark.slow, pytest.mark.background(synthetic=SYNTHETIC, **TRAIN)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache, background):
    "A tiny model trained on the synthetic study with the Trainer (checkpoints written), and its data."
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and immune to busy-waiting on a shared machine
    root = tmp_path_factory.mktemp("lesion")
    cfg = TrainConfig.make(synthetic=SYNTHETIC, cache_dir=str(cache), **TRAIN)
    t0 = time.perf_counter()
    background.wait()
    data = prepare_data(cfg)
    t1 = time.perf_counter()
    trainer = Trainer(data, cfg, out_dir=root / "run")
    trainer.fit()
    print(f"\nsynthetic study + features {t1 - t0:.1f} s, training {time.perf_counter() - t1:.1f} s")
    yield dict(model=trainer.model.eval(), data=data, root=root, checkpoint=root / "run" / "checkpoints" / "last.pt")
    torch.set_num_threads(threads)


def no_signal_region(data_dir, mask, size):
    "A contiguous blob of `size` units without planted signal, grown from the no-signal unit farthest from every planted ROI."
    truth = load_truth(data_dir)
    inside = np.asarray(truth["brain_mask"]) != 0
    roi_vol = np.zeros(inside.shape, np.int16); roi_vol[inside] = truth["roi"]
    roi = roi_vol[np.asarray(mask.dataobj) != 0]   # on the units of the subjects' shared mask, which may leave out brain voxels
    grid = UnitGrid(mask)
    dist = np.linalg.norm(grid.xyz[:, None] - grid.xyz[None, roi > 0], axis=-1).min(1)
    far = grid.xyz[np.argmax(np.where(roi == 0, dist, -1))]
    return blob_region(far, size, grid, NULL, allowed=roi == 0)


@pytest.fixture(scope="module")
def effects(run):
    """Lesion and keep-only effect tables of the planted ROIs and the no-signal blob over the validation block, from measured
    fMRI and from the stimulus, each against 20 requested matched control blobs."""
    data = lesion_data(run["data"], "val")
    regions = synthetic_regions(run["data"].data_dir, data.mask, ROIS)
    regions.append(no_signal_region(run["data"].data_dir, data.mask, regions[-1].size))
    out = {(mode, source): lesion_effects(run["model"], data, regions, mode=mode, source=source)
           for mode in ("lesion", "keep") for source in ("fmri", "stimulus")}
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        for k, t in out.items():
            print(k, t[t.metric == "nmse"][["region", "modality", "intact", "value", "effect", "null_mean", "specific",
                                            "specific_lo", "p", "rank", "n_null"]].round(4).to_string(index=False), sep="\n")
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
        parse_regions("cube:1", mask)


def _beats_its_null(t, roi, modality):
    "The ROI's effect on its modality lies beyond every matched blob's, with a CI excluding the null mean; no null: no p at all."
    r = _row(t, roi, modality)
    assert r.n_null_requested == 20 and r.n_null <= 20 and r.n_null_drawn >= r.n_null
    if r.n_null == 0:  # no blob of its size elsewhere reaches its decoder gain: said, not papered over
        assert np.isnan(r.p) and np.isnan(r["rank"]) and np.isnan(r.specific), r
        return
    assert r["rank"] == 1 and r.p == pytest.approx(1 / (1 + r.n_null)), r
    assert r.specific > 0 and r.specific_lo > 0, r


@pytest.mark.parametrize("source", ["fmri", "stimulus"])
def test_lesions_hit_their_modality(effects, source):
    """Decoding measured fMRI, and decoding the brain layer predicted from the stimulus: visual ROI -> video (>= 3x audio),
    auditory -> audio (>= 3x video), language -> text most; each beyond its matched null where one exists."""
    t = effects["lesion", source]
    v, a = _row(t, "visual", "video").effect, _row(t, "visual", "audio").effect
    assert v > 0 and v >= 3 * a, (v, a)
    v, a = _row(t, "auditory", "video").effect, _row(t, "auditory", "audio").effect
    assert a > 0 and a >= 3 * v, (a, v)
    lang = {m: _row(t, "language", m).effect for m in ("video", "audio", "text")}
    assert lang["text"] > max(lang["video"], lang["audio"]), lang
    for roi, modality in TARGET.items(): _beats_its_null(t, roi, modality)
    assert _row(t, "auditory", "audio").n_null > 0 and _row(t, "language", "text").n_null > 0
    # the null can say no: blobs as strongly read as the auditory ROI hurt the video more than the auditory ROI does
    assert _row(t, "auditory", "video")["rank"] > 1 and _row(t, "auditory", "video").specific < 0


@pytest.mark.parametrize("source", ["fmri", "stimulus"])
def test_no_signal_region_has_no_effect(effects, source):
    """Negative control: a region without planted signal has its 20 matched blobs; lesioned, it is not beyond all of them on
    any modality (p > 0.05) and its specific effect is under a tenth of the planted regions' smallest either way; kept
    alone, it never carries a modality by more than that. (Kept alone it may carry less than its matched blobs, which have
    the same summed decoder gain and so can hold a few units with signal: a region that carries less is no false effect.)"""
    for mode in ("lesion", "keep"):
        t = effects[mode, source]
        planted = min(_row(t, roi, modality).specific for roi, modality in TARGET.items() if _row(t, roi, modality).n_null)
        rows = [_row(t, NULL, modality) for modality in ("video", "audio", "text")]
        assert all(r.n_null == 20 for r in rows)
        assert max(r.specific for r in rows) < 0.1 * planted, (mode, planted, [r.specific for r in rows])
        if mode == "lesion":
            assert np.mean([abs(r.specific) for r in rows]) < 0.1 * planted, (planted, [r.specific for r in rows])
            for r in rows: assert r.p > 0.05 and r["rank"] > 1, r


@pytest.mark.parametrize("source", ["fmri", "stimulus"])
def test_keep_only_visual_carries_the_video(effects, source):
    "Keeping only the visual ROI reconstructs video better than keeping only the auditory ROI; each ROI beats its matched null."
    t = effects["keep", source]
    assert set(t.source) == {source}
    assert _row(t, "visual", "video").value < _row(t, "auditory", "video").value
    for roi, modality in TARGET.items(): _beats_its_null(t, roi, modality)


def test_mean_replacement(run, effects):
    """Lesioned units held at their training mean: the planted ROIs still hit their own modality, and the brain layer the
    model predicts has means that differ from 0, so the table differs from zeroing."""
    data = lesion_data(run["data"], "val")
    regions = synthetic_regions(run["data"].data_dir, data.mask, ROIS)
    t = lesion_effects(run["model"], data, regions, source="stimulus", replace="mean", n_null=5, n_boot=200)
    assert set(t["replace"]) == {"mean"}
    assert _row(t, "visual", "video").effect >= 3 * max(_row(t, "visual", "audio").effect, 0)
    assert _row(t, "auditory", "audio").effect >= 3 * max(_row(t, "auditory", "video").effect, 0)
    assert _row(t, "language", "text").effect > 0
    zero = effects["lesion", "stimulus"]
    assert not np.allclose(t.value, zero[zero.region != NULL].value)


def test_lesions_read_the_bold_the_run_trained_on(run):
    "With the default high-pass the measured BOLD a lesion decodes from is the run's filtered BOLD, not the raw study's."
    rd = run["data"]
    assert rd.cfg.data.high_pass > 0
    data = lesion_data(rd, "val")
    val = torch.as_tensor(rd.split.val)
    torch.testing.assert_close(data.tensors.fmri[0, val], rd.tensors.fmri[0, val])


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
        assert path.stat().st_mode & 0o777 == usual_mode()  # the usual mode, not owner-only
    tl = pd.read_csv(r.timeline)
    assert len(tl) == 8 and list(tl.tr) == list(data.trs[:8])
    assert tl["original"].fillna("").tolist() == [rd.aligned.texts[i] for i in data.trs[:8]]
    assert r.markdown.read_text().startswith("| tr | time_s | original | intact | lesion: visual |")


def test_cli_from_checkpoint(run, tmp_path, capsys):
    """lesion_main on the run's checkpoint rebuilds its data and writes the table, the figure and the media (usual file
    modes); a second run into the same folder is refused, and replaces it as a whole with overwrite."""
    model, rd = load_run(run["checkpoint"])
    assert rd.aligned.n_voxels == model.config.n_voxels
    np.testing.assert_array_equal(rd.split.val, run["data"].split.val)
    out = tmp_path / "out"
    table = lesion_main(str(run["checkpoint"]), str(out), regions="synthetic:visual;sphere:54,-22,8,9:A1r", n_null=5, n_boot=200,
                        render_trs=4)
    assert set(table.region) == {"visual", "A1r"} and (table.n_null_requested == 5).all()
    saved = pd.read_csv(out / "effects.csv")
    assert len(saved) == len(table) and (out / "effects.png").stat().st_size > 0
    for name in ("visual", "A1r"):
        assert (out / name / f"{name}_lesion.mp4").is_file() and (out / name / f"{name}_lesion_text.csv").is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".csv", ".png", ".mp4", ".wav", ".md"}
    assert all(p.stat().st_mode & 0o777 == usual_mode() for p in files), {p.name: oct(p.stat().st_mode) for p in files}
    assert all(p.stat().st_mode & 0o777 == usual_mode(folder=True) for p in [out, *[d for d in out.rglob("*") if d.is_dir()]])
    with pytest.raises(FileExistsError, match="already holds a lesion run"):
        lesion_main(str(run["checkpoint"]), str(out), regions="synthetic:auditory", n_null=2, n_boot=50, render_trs=0)
    lesion_main(str(run["checkpoint"]), str(out), regions="synthetic:auditory", n_null=2, n_boot=50, render_trs=0, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["effects.csv", "effects.png"]  # the old renders went with the old run
    assert set(pd.read_csv(out / "effects.csv").region) == {"auditory"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_cli_user_errors(run, tmp_path, capsys):
    "User errors exit 2 with one line (no traceback); a hostile pickle or random bytes are 'not a giblet checkpoint'."
    from giblet.cli import giblet_lesion
    hostile, junk = tmp_path / "hostile.pt", tmp_path / "junk.pt"
    hostile.write_bytes(pickle.dumps(os.system))  # unpickling it unsafely would hand over a shell
    junk.write_bytes(np.random.default_rng(0).bytes(10000))
    cases = {(str(tmp_path / "missing.pt"),): "no checkpoint here", (str(hostile),): f"{hostile} is not a giblet checkpoint",
             (str(junk),): f"{junk} is not a giblet checkpoint",
             (str(run["checkpoint"]), "--regions", "synthetic:hippocampus"): "no label named 'hippocampus'",
             (str(run["checkpoint"]), "--mode", "cut"): "--mode must be lesion or keep"}
    for args, message in cases.items():
        with pytest.raises(SystemExit) as e: giblet_lesion([*args, "--out", str(tmp_path / "o"), "--render-trs", "0"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and message in err, (args, err)
        assert "Traceback" not in err and "weights_only" not in err, err
    cli = subprocess.run([sys.executable, "-c", "from giblet.cli import giblet_lesion; giblet_lesion()", str(hostile), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert cli.returncode == 2 and cli.stderr.strip() == f"giblet-lesion: error: {hostile} is not a giblet checkpoint", cli.stderr
    assert not (tmp_path / "o").exists()  # nothing written on a refusal


def test_relative_paths_in_the_run_config(run, tmp_path, monkeypatch):
    "A run whose options hold a relative cache folder loads from any working folder: resolved against the run folder."
    ck = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    cache = Path(ck["config"]["train"]["data"]["cache_dir"])
    ck["config"]["train"]["data"]["cache_dir"] = os.path.relpath(cache, run["root"] / "run")
    assert not Path(ck["config"]["train"]["data"]["cache_dir"]).is_absolute()
    moved = run["root"] / "run" / "checkpoints" / "relative.pt"
    torch.save(ck, moved)
    monkeypatch.chdir(tmp_path)
    _, rd = load_run(moved)
    assert rd.cfg.data.cache_dir == str(cache.resolve()) and Path(rd.cfg.data.cache_dir).is_absolute()


def test_papermill_notebook(run, tmp_path, repo_root, monkeypatch):
    "The lesion tutorial runs under papermill with its parameters and writes the table, the figure and the media."
    import papermill as pm
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel's torch: tiny ops, no busy-waiting threads
    pm.execute_notebook(str(repo_root / "nbs" / "tutorials" / "lesion.ipynb"), str(tmp_path / "lesion.ipynb"),
                        parameters=dict(checkpoint=str(run["checkpoint"]), regions="synthetic:auditory", out_dir=str(tmp_path / "out"),
                                        render_trs=4, n_boot=200, n_null=5, source="fmri"), cwd=str(tmp_path), progress_bar=False)
    table = pd.read_csv(tmp_path / "out" / "effects.csv")
    assert set(table.region) == {"auditory"} and set(table.source) == {"fmri"}
    assert (tmp_path / "out" / "effects.png").is_file() and (tmp_path / "out" / "auditory" / "auditory_lesion.mp4").is_file()


def test_lesion_on_a_stream_trained_run(tmp_path, monkeypatch, capsys):
    """A run trained with a pretrained feature stream is lesioned from its checkpoint by giblet-lesion: the stream its config
    names comes back from its cache into every window the model reads, and the effect table comes out."""
    pytest.importorskip("transformers", reason="transformers (the [features] extra) is not installed")
    import json
    from giblet import cli
    from giblet.features import tiny_backbone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    dino = tiny_backbone(tmp_path / "dino", "image")
    fast = dict(QUICK_32, synthetic=dict(n_subjects=2, n_trs=240, shape=[10, 12, 10], size=[32, 18], seed=1))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    argv = ["--out", str(run_dir), "--cache-dir", str(cache), "--epochs", "1", "--device", "cpu", "--no-baseline",
            "--config", json.dumps(fast), "--features", f"video={dino}:-1:n_frames=2"]
    cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))
    checkpoint = run_dir / "checkpoints" / "last.pt"
    model, rd = load_run(checkpoint)
    assert model.config.stream_dims == {"video": 16} and set(rd.streams) == {"video"}
    data = lesion_data(rd, "test")
    batch = data.tensors.gather(torch.as_tensor(data.trs[:2]), model.config.context_trs)
    assert batch["stream_video"].shape == (2, model.config.context_trs, 16)
    np.testing.assert_array_equal(batch["stream_video"][:, 0].numpy(), rd.streams["video"][data.trs[:2]])
    try:
        cli.giblet_lesion([str(checkpoint), "--out", str(tmp_path / "lesion"), "--regions", "synthetic:visual", "--n-null", "2",
                           "--n-boot", "50", "--render-trs", "2"])
    finally: torch.set_num_threads(threads)
    table = pd.read_csv(tmp_path / "lesion" / "effects.csv")
    assert set(table.region) == {"visual"} and {"video", "audio", "text"} <= set(table.modality)
    assert np.isfinite(table["effect"]).all() and (tmp_path / "lesion" / "visual" / "visual_lesion.mp4").is_file()
    ck = torch.load(checkpoint, map_location="cpu", weights_only=True)   # a run whose options lost the stream: refused by name
    ck["config"]["train"]["data"]["features"] = []
    torch.save(ck, tmp_path / "no_stream.pt")
    with pytest.raises(ValueError, match=r"reads feature streams \['video'\] but its run's data has \[\]"):
        load_run(tmp_path / "no_stream.pt")
