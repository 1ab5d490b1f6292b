"""The command line: giblet-train end to end (files, resume, bad input), the papermill training notebook,
giblet-sweep and giblet-synth."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from giblet import cli
from giblet.training import trainer as T
from giblet.training.trainer import embedded_dataset

SMALL = dict(n_subjects=2, n_trs=120, seed=0, shape=[14, 17, 14], size=[64, 36])
FAST = dict(batch_size=8, recon_frac=0.5, patience=0, synthetic=SMALL, stride=3,
            skip_first=3,
            model_overrides=dict(context_trs=8, temporal_kernel=6, brain_rank=4))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "giblet-cache"


@pytest.fixture(scope="session")
def study(cache):
    return embedded_dataset(cache, **SMALL)


def train(out, cache, *extra, config=FAST, epochs=2):
    "giblet-train in this process, on arguments parsed as its console script parses them."
    argv = ["--out", str(out), "--cache-dir", str(cache), "--epochs", str(epochs), "--device", "cpu",
            "--config", json.dumps(dict(config, progress=False)), *extra]
    return cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache, study):
    "One small run on the embedded synthetic dataset (no --data-dir)."
    out = tmp_path_factory.mktemp("run") / "demo"
    m = train(out, cache)
    return out, m


def test_train_writes_the_report(run, study):
    out, m = run
    mf = json.loads((out / "metrics.json").read_text())
    for k in ("val_voxel_r_mean", "ridge_val_voxel_r_mean", "noise_ceiling_mean", "val_trs", "n_voxels", "epochs",
              "train_seconds", "report", "truth_r_responsive_mean"):
        assert k in mf, k
    assert mf["epochs"] == 2 and mf["train_seconds"] > 0
    assert np.isfinite([mf["val_voxel_r_mean"], mf["ridge_val_voxel_r_mean"], mf["noise_ceiling_mean"]]).all()
    regions = [r["region"] for r in mf["report"]]
    assert regions[0] == "all" and {"visual", "auditory", "language"} <= set(regions)
    # validation TRs: one contiguous block at the end, after the gap
    val = np.array(mf["val_trs"])
    assert (np.diff(val) == 1).all() and val[-1] == SMALL["n_trs"] - 1
    # val_pred: the input's space, one volume per validation TR, z-scored subject average
    src = nib.load(sorted((study / "sherlock_nii").glob("*.nii.gz"))[0])
    pred = nib.load(out / "val_pred.nii.gz")
    assert pred.shape == src.shape[:3] + (len(val),)
    np.testing.assert_allclose(pred.affine, src.affine)
    mask = np.asarray(nib.load(out / "mask.nii.gz").dataobj) > 0
    assert mask.sum() == mf["n_voxels"]
    vox = np.asarray(pred.dataobj)[mask]
    assert np.isfinite(vox).all() and vox.std() > 0 and not np.asarray(pred.dataobj)[~mask].any()
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg) == {"train", "model", "features"} and cfg["model"]["n_voxels"] == mf["n_voxels"]
    assert cfg["train"]["data_dir"] is None
    assert (out / "checkpoints" / "config.json").is_file()
    assert {p.name for p in (out / "checkpoints").glob("*.pt")} == {"best.pt", "last.pt"}
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert names == {"loss_curves", "voxel_r_hist", "voxel_r_glass_brain", "reconstructions"}
    log = pd.read_csv(out / "log.csv")
    assert len(log) == 2 and {"train_total", "val_total", "val_voxel_r_mean"} <= set(log.columns)


def test_resume_continues_and_refuses_changes(run, cache):
    out, _ = run
    m = train(out, cache, "--resume", epochs=3)  # one more epoch, options kept from the saved run
    assert m["epochs"] == 3
    assert len(pd.read_csv(out / "log.csv")) == 3
    before = (out / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"train\.lr"):
        train(out, cache, "--resume", "--lr", "0.5", epochs=4)
    with pytest.raises(ValueError, match=r"train\.seed"):
        train(out, cache, "--resume", "--seed", "7", epochs=4)
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_out_folder_holding_another_run(run, cache, capsys):
    out, _ = run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        cli.giblet_train(["--out", str(out), "--cache-dir", str(cache), "--device", "cpu"])
    assert e.value.code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_missing_modality(tmp_path, study, cache, capsys):
    broken = tmp_path / "study"
    shutil.copytree(study, broken)
    (broken / "stimuli_Sherlock.m4v").unlink()
    with pytest.raises(SystemExit) as e:
        cli.giblet_train(["--data-dir", str(broken), "--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no film file" in err and str(broken) in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_cuda_asked_for_but_absent(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        cli.giblet_train(["--out", str(tmp_path / "out"), "--cache-dir", str(cache), "--device", "cuda"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nan_loss_exits_naming_the_term(tmp_path, cache, study, monkeypatch, capsys):
    out = tmp_path / "out"
    real = T.compute_losses

    def nan_audio(out_, batch, variances, **kw):  # the audio term goes bad once the first checkpoint is written
        terms = real(out_, batch, variances, **kw)
        if "audio" in terms and (out / "checkpoints" / "last.pt").exists():
            terms["audio"] = terms["audio"] * float("nan"); terms["total"] = terms["total"] + terms["audio"]
        return terms

    monkeypatch.setattr(T, "compute_losses", nan_audio)
    with pytest.raises(SystemExit) as e:
        cli.giblet_train(["--out", str(out), "--cache-dir", str(cache), "--device", "cpu", "--epochs", "3",
                          "--config", json.dumps(dict(FAST, progress=False))])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "'audio'" in err and "epoch 2, batch 1" in err and "last good checkpoint" in err
    assert T.load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (out / "metrics.json").exists()


def test_console_script_help():
    exe = Path(sys.executable).parent / "giblet-train"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--data_dir" in res.stdout and "--resume" in res.stdout


def test_papermill_notebook_and_sweep(tmp_path, cache, study):
    "The training notebook runs under papermill (as documented) and giblet-sweep runs it over a grid."
    nb = REPO / "nbs" / "tutorials" / "train.ipynb"
    params = ["-p", "cache_dir", str(cache), "-p", "epochs", "2"]
    res = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(tmp_path / "out.ipynb"), "-p", "out_dir",
                          str(tmp_path / "a"), *params, "--cwd", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["epochs"] == 2 and (tmp_path / "a" / "val_pred.nii.gz").is_file()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"epochs: [1]\nseed: [0, 1]\ncache_dir: {cache}\n")
    df = cli.sweep_main(str(grid), str(tmp_path / "sweep"))
    assert list(df.status) == ["ok", "ok"] and list(df.seed) == [0, 1]
    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert len(summary) == 2 and summary.val_voxel_r_mean.notna().all()
    assert (tmp_path / "sweep" / "run_001.ipynb").is_file() and (tmp_path / "sweep" / "run_001" / "metrics.json").is_file()


def test_synth(tmp_path):
    png = cli.synth_main(out=str(tmp_path / "syn"), n_subjects=2, n_trs=40, seed=3, preset="tiny")
    assert png.is_file() and png.stat().st_size > 10_000
    assert len(list((tmp_path / "syn" / "sherlock_nii").glob("*.nii.gz"))) == 2
    with pytest.raises(FileExistsError):
        cli.synth_main(out=str(tmp_path / "syn"), n_trs=40, preset="tiny")
