"""The command line: giblet-train end to end (the test-block report, resume, bad input), outer folds, one parser and
one set of exit codes for every console script, the papermill training notebook, giblet-sweep and giblet-synth."""
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
from giblet.training.checkpoints import load_checkpoint
from conftest import QUICK, SMALL   # the small study of the `cache` and `study` fixtures

FAST = dict(QUICK, synthetic=SMALL, stride=3)   # giblet-train's --config for the small study
REPO = Path(__file__).resolve().parents[1]


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
    for k in ("test_voxel_r_selected", "test_voxel_r_mean", "banded_ridge_test_voxel_r_selected", "ridge_test_voxel_r_selected",
              "noise_ceiling_test_selected", "test_trs", "val_trs", "n_voxels", "epochs", "train_seconds", "table", "roi_table",
              "truth_r_responsive_mean", "banded_ridge_truth_r_responsive_mean", "verdict", "comparison", "headline"):
        assert k in mf, k
    assert mf["block"] == "test" and mf["epochs"] == 2 and mf["train_seconds"] > 0
    assert not any(k.startswith("val_voxel") for k in mf)                # no validation score is reported
    assert np.isfinite([mf["test_voxel_r_selected"], mf["banded_ridge_test_voxel_r_selected"], mf["noise_ceiling_test_selected"]]).all()
    assert [r["row"] for r in mf["table"]] == ["giblet model", "himalaya banded ridge", "himalaya ridge",
                                               "giblet model stacked with the banded ridge", "noise ceiling"]
    assert mf["stack_verdict"] in ("ahead", "level", "behind") and 0 <= mf["stack_weights"]["model_share_selected"] <= 1
    assert mf["verdict"] in ("ahead", "level", "behind") and mf["baseline"]["delays_s"][-1] >= 12
    d = mf["comparison"]["differences"]["banded_ridge"]
    assert d["ci_low"] <= d["difference"] <= d["ci_high"] and mf["comparison"]["block_s"] >= 20
    regions = [r["region"] for r in mf["roi_table"]]
    assert regions[:2] == ["all", "selected"] and {"visual", "auditory", "language"} <= set(regions)
    assert f">= {mf['headline']['ceiling_threshold']}" in mf["headline"]["voxels"]
    # train | gap | val | gap | test: contiguous blocks, the test block at the end, gaps of at least 32 s
    val, test = np.array(mf["val_trs"]), np.array(mf["test_trs"])
    assert (np.diff(val) == 1).all() and (np.diff(test) == 1).all() and test[-1] == SMALL["n_trs"] - 1
    assert (test[0] - val[-1] - 1) * 1.5 >= 32 and val[0] - 1 - mf["n_train_trs"] >= 21
    # test_pred and val_pred: the input's space, one volume per TR of the block, z-scored subject average
    src = nib.load(sorted((study / "sherlock_nii").glob("*.nii.gz"))[0])
    mask = np.asarray(nib.load(out / "mask.nii.gz").dataobj) > 0
    assert mask.sum() == mf["n_voxels"]
    for name, block in (("test_pred", test), ("val_pred", val)):
        pred = nib.load(out / f"{name}.nii.gz")
        assert pred.shape == src.shape[:3] + (len(block),)
        np.testing.assert_allclose(pred.affine, src.affine)
        vox = np.asarray(pred.dataobj)[mask]
        assert np.isfinite(vox).all() and vox.std() > 0 and not np.asarray(pred.dataobj)[~mask].any()
    split = nib.load(out / "modality_r2.nii.gz")
    assert split.shape == src.shape[:3] + (3,)                           # video, audio, text
    report = (out / "report.md").read_text()
    assert "test block" in report and "banded ridge" in report and d["verdict"] in report
    cfg = json.loads((out / "config.json").read_text())
    assert set(cfg) == {"train", "model", "features"} and cfg["model"]["n_voxels"] == mf["n_voxels"]
    assert cfg["train"]["data"]["data_dir"] is None
    assert (out / "checkpoints" / "config.json").is_file()
    assert {p.name for p in (out / "checkpoints").glob("*.pt")} == {"best.pt", "last.pt"}
    names = {p.stem for p in (out / "figures").glob("*.png")}
    assert names == {"loss_curves", "voxel_r_hist", "voxel_r_glass_brain", "reconstructions", "modality_map"}
    log = pd.read_csv(out / "log.csv")
    assert len(log) == 2 and {"train_total", "val_total", "val_voxel_r_mean"} <= set(log.columns)


def test_resume_continues_and_refuses_changes(run, cache, caplog):
    out, _ = run
    with caplog.at_level("INFO", logger="giblet"):
        m = train(out, cache, "--resume", epochs=3)  # one more epoch, options kept from the saved run
    assert m["epochs"] == 3
    closing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test voxel r")]   # its last line says report.md's words
    assert len(closing) == 1 and m["in_words"] and all(f"; {w}" in closing[0] for w in m["in_words"])
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
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert not (out / "metrics.json").exists()


@pytest.mark.slow   # a fresh process (python, torch and giblet imported)
def test_console_script_help():
    exe = Path(sys.executable).parent / "giblet-train"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--data-dir" in res.stdout and "--data_dir" not in res.stdout and "--resume" in res.stdout


@pytest.mark.slow   # three fresh kernels
def test_papermill_notebook_and_sweep(tmp_path, cache, study):
    "The training notebook runs under papermill (as documented) and giblet-sweep runs it over a grid."
    nb = REPO / "nbs" / "tutorials" / "train.ipynb"
    params = ["-p", "cache_dir", str(cache), "-p", "epochs", "2"]
    res = subprocess.run([sys.executable, "-m", "papermill", str(nb), str(tmp_path / "out.ipynb"), "-p", "out_dir",
                          str(tmp_path / "a"), *params, "--cwd", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["block"] == "test" and (tmp_path / "a" / "test_pred.nii.gz").is_file()
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"epochs: [1]\nseed: [0, 1]\ncache_dir: {cache}\n")
    df = cli.sweep_main(str(grid), str(tmp_path / "sweep"))
    assert list(df.status) == ["ok", "ok"] and list(df.seed) == [0, 1]
    summary = pd.read_csv(tmp_path / "sweep" / "summary.csv")
    assert len(summary) == 2 and summary.test_voxel_r_selected.notna().all()
    assert (tmp_path / "sweep" / "run_001.ipynb").is_file() and (tmp_path / "sweep" / "run_001" / "metrics.json").is_file()


def test_synth(tmp_path):
    png = cli.synth_main(out=str(tmp_path / "syn"), n_subjects=3, n_trs=40, seed=3, preset="tiny")
    assert png.is_file() and png.stat().st_size > 10_000
    assert len(list((tmp_path / "syn" / "sherlock_nii").glob("*.nii.gz"))) == 3   # typed, though it equals the default: it wins
    with pytest.raises(FileExistsError):
        cli.synth_main(out=str(tmp_path / "syn"), n_trs=40, preset="tiny")


@pytest.mark.slow   # three runs and their summary
def test_outer_folds(tmp_path, cache, study):
    "--n-folds 3: one run per fold, each testing on its own block, and a summary over the folds."
    out = tmp_path / "cv"
    m = train(out, cache, "--n-folds", "3", "--no-baseline", epochs=1)
    assert m["n_folds"] == 3 and len(m["folds"]) == 4 and m["block"] == "test"
    tests = [json.loads((out / f"fold_{k}" / "metrics.json").read_text())["test_trs"] for k in range(3)]
    assert sorted(t for ts in tests for t in ts) == list(range(SMALL["n_trs"]))  # the folds' test blocks tile the series
    assert (out / "folds.csv").is_file() and "outer cross-validation" in (out / "report.md").read_text()
    cfg = json.loads((out / "fold_2" / "config.json").read_text())["train"]["data"]
    assert (cfg["n_folds"], cfg["fold"]) == (3, 2)


def test_every_option_is_reachable_and_user_errors_exit_2(tmp_path, cache, capsys):
    args = cli.cli_args(cli.train_main, "giblet-train", ["--data-dir", "d", "--set", "gap=40", "--set=w_corr=0.5"])
    assert args["data_dir"] == "d" and args["set"] == ["gap=40", "w_corr=0.5"]
    cfg = cli.train_config(sets=args["set"])
    assert (cfg.data.gap, cfg.loss.w_corr) == (40, 0.5)
    for argv, msg in ((["--set", "no_such_option=1"], "unknown keys"), (["--set", "gap"], "KEY=VALUE"),
                      (["--set", "subjects=both"], "subjects")):
        with pytest.raises(SystemExit) as e:
            cli.giblet_train(["--out", str(tmp_path / "o"), "--cache-dir", str(cache), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script", [cli.giblet_train, cli.giblet_cache, cli.giblet_lesion])
def test_help_spells_every_option_with_dashes(script, capsys):
    "giblet-train --help printed --data_dir and --n_folds while the README wrote --data-dir and --n-folds."
    with pytest.raises(SystemExit) as e: script(["--help"])
    out = capsys.readouterr().out
    options = [w.strip("[],") for w in out.split() if w.startswith(("--", "[--"))]
    assert e.value.code == 0 and "--data-dir" in options and "--data_dir" not in out, out
    assert not [o for o in options if "_" in o], out


def test_the_underscore_spelling_is_still_taken(capsys):
    "Scripts written for the old help keep working: --data_dir and --n_boot name the dashed options."
    args = cli.cli_args(cli.train_main, "giblet-train", ["--data_dir", "d", "--no_baseline", "--n_folds=3", "--set", "a=1"])
    assert (args["data_dir"], args["no_baseline"], args["n_folds"], args["set"]) == ("d", True, 3, ["a=1"])


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    "A fault in giblet is not a user error: it propagates (the console script prints the traceback and exits 1)."
    def broken(*a, **k): raise KeyError("a bug")
    monkeypatch.setattr(cli, "run_training", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.giblet_train(["--out", str(tmp_path / "o")])


def test_giblet_lesion_parser_and_exit_codes(monkeypatch, capsys):
    "giblet-lesion parses lesion_main's docments like every other script: 0 and the table, 2 and one line, 1 and the traceback."
    from giblet import lesion_run
    seen = {}

    def fake_main(checkpoint:str, # a checkpoint
                  data_dir:str=None, # the study folder
                  n_boot:int=10, # replicates
                 ):
        seen.update(checkpoint=checkpoint, data_dir=data_dir, n_boot=n_boot)
        if checkpoint == "missing": raise FileNotFoundError("no checkpoint at missing")
        if checkpoint == "bug": raise ZeroDivisionError("a bug")
        return pd.DataFrame({"region": ["visual"], "effect": [0.5]})

    monkeypatch.setattr(lesion_run, "lesion_main", fake_main)
    assert cli.giblet_lesion(["ck.pt", "--data-dir", "d", "--n-boot", "5"]) is None
    assert seen == dict(checkpoint="ck.pt", data_dir="d", n_boot=5) and "visual" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e: cli.giblet_lesion(["missing"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == "giblet-lesion: error: no checkpoint at missing"
    with pytest.raises(ZeroDivisionError): cli.giblet_lesion(["bug"])
    with pytest.raises(SystemExit) as e: cli.giblet_lesion(["ck.pt", "--no-such-option"])
    assert e.value.code == 2


@pytest.mark.slow   # two fresh processes per script
@pytest.mark.parametrize("script", ["giblet-train", "giblet-sweep", "giblet-synth", "giblet-cache"])
def test_console_scripts_exit_0_and_2(script, tmp_path):
    exe = Path(sys.executable).parent / script
    assert subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120).returncode == 0
    bad = {"giblet-train": ["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")],
           "giblet-sweep": [str(tmp_path / "no.yaml"), str(tmp_path / "s")],
           "giblet-synth": ["--out", str(tmp_path / "s"), "--preset", "no_such_preset"],
           "giblet-cache": ["--study", str(tmp_path / "no.yaml"), "--cache-dir", str(tmp_path / "c")]}[script]
    res = subprocess.run([str(exe), *bad], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len([l for l in res.stderr.splitlines() if l.startswith(script)]) == 1


def test_a_locked_run_folder_is_refused(tmp_path, cache, capsys):
    from giblet.io import RunLock
    out = tmp_path / "busy"
    with RunLock(out):                       # another giblet-train holds the folder
        with pytest.raises(SystemExit) as e: cli.giblet_train(["--out", str(out), "--cache-dir", str(cache), "--device", "cpu"])
    assert e.value.code == 2 and "in use by process" in capsys.readouterr().err
    assert not (out / "config.json").exists()


def test_changed_inputs_refuse_resume_and_a_run_without_checkpoint_restarts(tmp_path, cache, study, capsys):
    src = tmp_path / "study"; shutil.copytree(study, src)
    out = tmp_path / "run"
    cfg = dict(FAST); cfg.pop("synthetic")
    train(out, cache, "--data-dir", str(src), "--no-baseline", epochs=1, config=cfg)
    saved = json.loads((out / "inputs.json").read_text())
    nii = sorted((src / "sherlock_nii").glob("*.nii.gz"))[0]
    assert str(nii.resolve()) in [f["path"] for f in saved]
    img = nib.load(nii); data = np.asarray(img.dataobj).copy(); data[..., -1] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), nii)      # one subject's scan replaced
    with pytest.raises(SystemExit) as e:
        cli.giblet_train(["--out", str(out), "--resume", "--epochs", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "changed since the run began" in err and nii.name in err
    # a run killed before its first checkpoint: --resume starts it from scratch (a fresh start reuses the folder alike)
    fresh = tmp_path / "early"; fresh.mkdir(); shutil.copy(out / "config.json", fresh / "config.json")
    m = train(fresh, cache, "--resume", "--no-baseline", epochs=1, config=cfg)
    assert m["epochs"] == 1 and (fresh / "checkpoints" / "last.pt").is_file() and (fresh / "inputs.json").is_file()


def test_resume_after_a_kill_while_an_older_layout_moved_over(tmp_path, cache, study, caplog):
    "A kill between moving an older layout's checkpoints/ aside and linking it leaves no `checkpoints`: --resume mends it and continues."
    out = tmp_path / "run"
    train(out, cache, "--no-baseline", epochs=1)
    snap = (out / "checkpoints").resolve()
    (out / "checkpoints").unlink(); snap.rename(out / ".checkpoints.000000")   # the state such a kill leaves
    (out / "metrics.json").unlink()                                            # killed mid-run: no report yet
    with caplog.at_level("INFO", logger="giblet"):
        m = train(out, cache, "--resume", "--no-baseline", epochs=2)
    assert "resumed" in caplog.text and "from scratch" not in caplog.text and "afresh" not in caplog.text
    log = json.loads((out / "log.json").read_text())
    assert m["epochs"] == 2 and [r["epoch"] for r in log] == [1, 2]


@pytest.mark.slow   # torchrun: two fresh processes
def test_a_user_error_on_rank_0_reaches_the_other_ranks_at_once(tmp_path, cache, study):
    "Under torchrun, a resume refused on rank 0 (the study changed) ends rank 1 too, instead of leaving it waiting for data."
    import os, time
    src = tmp_path / "study"; shutil.copytree(study, src)
    out = tmp_path / "run"
    cfg = dict(FAST); cfg.pop("synthetic")
    train(out, cache, "--data-dir", str(src), "--no-baseline", epochs=1, config=cfg)
    nii = sorted((src / "sherlock_nii").glob("*.nii.gz"))[0]
    img = nib.load(nii); data = np.asarray(img.dataobj).copy(); data[..., -1] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), nii)
    env = dict(os.environ, OMP_NUM_THREADS="1", GIBLET_CACHE=str(cache))
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                          "giblet-train", "--out", str(out), "--resume", "--epochs", "2", "--cache-dir", str(cache)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0
    assert "changed since the run began" in res.stderr and "rank 0 could not prepare the data" in res.stderr, res.stderr[-3000:]
    assert time.monotonic() - start < 240


@pytest.mark.slow   # torchrun: two fresh processes
def test_two_processes_run_one_study_and_rank_0_writes_the_report(tmp_path, cache, study):
    "Under torchrun both ranks call the same run and the same evaluation (the predictor sums their shares); rank 0 alone reports."
    import os
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python",
                          "giblet-train", "--out", str(out), "--cache-dir", str(cache), "--device", "cpu", "--epochs", "1",
                          "--config", json.dumps(dict(FAST, progress=False))], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["block"] == "test" and np.isfinite(m["test_voxel_r_selected"]) and m["verdict"]
    assert res.stdout.count('"block": "test"') == 1, res.stdout   # one headline: rank 1 wrote and printed nothing
    assert (out / "test_pred.nii.gz").is_file() and (out / "report.md").is_file()


def test_giblet_cache_verify_checks_the_stream_caches(tmp_path, monkeypatch, capsys):
    "giblet-cache --verify checksums the feature-stream caches under --cache-dir too: a corrupted byte is found and removed."
    pytest.importorskip("transformers", reason="transformers (the [features] extra) is not installed")
    from giblet.data.audio import demo_waveform
    from giblet.features import extract_stream, tiny_backbone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, wave = tiny_backbone(tmp_path / "w2v", "audio"), (demo_waveform(5.0, 16000), 16000)
    streams = tmp_path / "cache" / "features"   # where a run with --cache-dir puts its streams
    good, bad = (extract_stream(f"audio={model}:{layer}", wave, np.arange(4.0), 1.0, streams, progress=False) for layer in (1, 2))
    data = bytearray((bad / "features.npy").read_bytes()); data[-5] ^= 0x10
    (bad / "features.npy").write_bytes(bytes(data))
    unfinished = streams / "audio-0123456789abcdef"; unfinished.mkdir()
    (unfinished / "manifest.json").write_text(json.dumps(dict(key={}, chunk_trs=2, complete=False)))
    cli.giblet_cache(["--cache-dir", str(tmp_path / "cache"), "--only-verify"])
    out = json.loads(capsys.readouterr().out)
    assert out == dict(verified=1, removed=[str(bad)], unfinished=[str(unfinished)])
    assert not bad.exists() and (good / "features.npy").is_file() and unfinished.is_dir()
