"""End-to-end tests of giblet.training.trainer on a small synthetic study: exact resume, crash safety, NaN handling,
two-process DDP on CPU (gloo), and the planted-truth target."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from giblet.dataset import context_starts
from giblet.training import trainer as T
from giblet.evaluation import evaluate_run
from giblet.training import checkpoints as C
from giblet.training.checkpoints import load_checkpoint
from giblet.synthetic_truth import embedded_dataset, study_truth
from giblet.training.config import TrainConfig
from giblet.training.data import prepare_data
from giblet.training.trainer import NonFiniteLoss, Trainer

from conftest import FAST, SMALL   # the small study of the `cache` and `study` fixtures, and two quick epochs on it

# The planted-truth target is checked on a study like the embedded one (600 TRs, 10 subjects, noise at the generator's
# default), on a coarser grid and a 10 fps film so that it is quick to write.
PLANTED = dict(n_subjects=10, n_trs=600, shape=[14, 17, 14], size=[64, 36], fps=10, seed=0)
# the default options on it (its study and features are built in the session's background process)
PLANTED_RUN = dict(synthetic=PLANTED, device="cpu", progress=False, decode_from="brain")


def cfg_for(cache, study, **kw):
    return TrainConfig.make(**{**FAST, "data_dir": str(study), "cache_dir": str(cache), "synthetic": SMALL, **kw})


@pytest.fixture(scope="session")
def data(cache, study):
    return prepare_data(cfg_for(cache, study))


def test_embedded_dataset_is_reused(cache, study):
    assert (study / ".complete").is_file() and (study / "truth.npz").is_file()
    assert embedded_dataset(cache, **SMALL) == study
    assert json.loads((study / "synthetic.json").read_text()) == json.loads(json.dumps(SMALL))


def test_resume_is_bit_exact(tmp_path, cache, study, data):
    "2 epochs, a restart from last.pt, 2 more epochs == 4 straight epochs (CPU, same seed)."
    cfg = cfg_for(cache, study, epochs=4)
    straight = Trainer(data, cfg, tmp_path / "a")
    straight.fit()
    Trainer(data, cfg, tmp_path / "b").fit(until_epoch=2)
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] == 2
    resumed = Trainer(data, cfg, tmp_path / "b").resume()
    assert resumed.epoch == 2 and resumed.loader.epoch == 2
    resumed.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.opt.state_dict()["state"].values(), resumed.opt.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"])
    assert [h["val_voxel_r_mean"] for h in straight.history] == [h["val_voxel_r_mean"] for h in resumed.history]
    log = json.loads((tmp_path / "b" / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert {"train_fmri", "train_video", "train_audio", "train_text", "val_fmri", "val_voxel_r_mean", "lr"} <= set(log[0])


def test_resume_refuses_another_config(tmp_path, cache, study, data):
    Trainer(data, cfg_for(cache, study, epochs=2), tmp_path).fit(until_epoch=1)
    other = Trainer(data, cfg_for(cache, study, epochs=2, lr=0.5), tmp_path)
    with pytest.raises(ValueError, match=r"train\.lr"):
        other.resume()


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, cache, study, data, monkeypatch):
    "An exception in the middle of writing last.pt leaves the previous one whole and no stray file."
    tr = Trainer(data, cfg_for(cache, study, epochs=3), tmp_path)
    tr.fit(until_epoch=1)
    ck = tmp_path / "checkpoints" / "last.pt"
    before = ck.read_bytes()
    real_save = torch.save

    def half_then_die(obj, f, *a, **k):
        import io
        buf = io.BytesIO(); real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(T.torch, "save", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(until_epoch=2)
    monkeypatch.undo()
    assert ck.read_bytes() == before
    assert not [p for p in ck.parent.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(ck)["epoch"] == 1
    assert Trainer(data, cfg_for(cache, study, epochs=3), tmp_path).resume().epoch == 1


@pytest.mark.slow   # a fresh process, killed outright
def test_hard_kill_while_writing_keeps_previous_checkpoint(tmp_path, cache, study, data):
    "A process killed outright (no cleanup) while writing last.pt leaves the previous checkpoint loadable."
    cfg = cfg_for(cache, study, epochs=3)
    Trainer(data, cfg, tmp_path).fit(until_epoch=1)
    script = textwrap.dedent(f"""
        import io, os, torch
        from giblet.training import trainer as T
        from giblet.training.config import TrainConfig
        from giblet.training.data import prepare_data
        import json; cfg = TrainConfig.from_dict(json.loads({json.dumps(json.dumps(cfg.to_dict()))}))
        tr = T.Trainer(prepare_data(cfg), cfg, {str(tmp_path)!r}).resume()
        real = torch.save
        def die(obj, f, *a, **k):
            buf = io.BytesIO(); real(obj, buf); f.write(buf.getvalue()[:1000]); f.flush(); os._exit(9)
        T.torch.save = die
        tr.fit(until_epoch=2)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 9, res.stderr[-2000:]
    ck = tmp_path / "checkpoints" / "last.pt"
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the half-written checkpoint folder it left behind
    assert load_checkpoint(ck)["epoch"] == 1
    assert Trainer(data, cfg, tmp_path).resume().epoch == 1


def test_nan_loss_stops_and_names_the_term(tmp_path, cache, study, data, monkeypatch):
    tr = Trainer(data, cfg_for(cache, study, epochs=3), tmp_path)
    tr.fit(until_epoch=1)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    real = T.compute_losses

    def bad_video(out, batch, variances, **kw):
        terms = real(out, batch, variances, **kw)
        if "video" in terms:
            terms["video"] = terms["video"] * float("nan"); terms["total"] = terms["total"] + terms["video"]
        return terms

    monkeypatch.setattr(T, "compute_losses", bad_video)
    with pytest.raises(NonFiniteLoss, match=r"'video'.*epoch 2, batch 1.*last good checkpoint.*epoch 1"):
        tr.fit()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


@pytest.mark.slow   # torchrun: two fresh processes
def test_ddp_two_cpu_processes_match_one(tmp_path, cache, study, data):
    """torchrun with 2 gloo processes of batch 4 trains the same model as 1 process of batch 8, the validation
    prediction is all-reduced, and only rank 0 writes; the windows are chosen so that no rank gets padding."""
    k = next(k for k in range(8, 30) if len(context_starts(data.split.train, data.aligned.run, k)) % 8 == 0)
    over = dict(context_trs=k, temporal_kernel=6, brain_rank=4, dropout=0.0, modality_dropout=0.0)
    common = dict(epochs=1, decode_from="brain", w_text=0.0, recon_frac=1.0, stride=1, model_overrides=over)
    one = Trainer(data, cfg_for(cache, study, batch_size=8, **common), tmp_path / "one")
    one.fit()
    cfg2 = cfg_for(cache, study, batch_size=4, **common)
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, numpy as np
        from giblet.training import trainer as T
        from giblet.training.config import TrainConfig
        from giblet.training.data import prepare_data
        cfg = TrainConfig.from_dict(json.loads({json.dumps(json.dumps(cfg2.to_dict()))}))
        from giblet.training.distributed import close_distributed, init_distributed
        di = init_distributed("cpu")
        tr = T.Trainer(prepare_data(cfg, "cpu", di), cfg, {str(tmp_path / "two")!r}, di)
        assert len(tr.loader) == {len(one.loader)}, len(tr.loader)
        tr.fit()
        np.save({str(tmp_path)!r} + f"/pred{{di.rank}}.npy", tr.predict(tr.data.split.val))
        close_distributed()
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert len(two["rng"]) == 2  # both processes' random states are kept
    # the same training weights and the same moving average, up to float summation order
    for name, a in one.model.state_dict().items():
        torch.testing.assert_close(two["train_weights"][name], a, rtol=1e-3, atol=1e-4, msg=name)
    for name, a in one.ema.items():
        torch.testing.assert_close(two["model"]["state_dict"][name], a, rtol=1e-3, atol=1e-4, msg=name)
    p0, p1 = np.load(tmp_path / "pred0.npy"), np.load(tmp_path / "pred1.npy")
    np.testing.assert_array_equal(p0, p1)  # the all-reduced prediction is the same on both ranks
    np.testing.assert_allclose(p0, one.predict(data.split.val), atol=1e-3)
    assert abs(two["history"][-1]["val_voxel_r_mean"] - one.history[-1]["val_voxel_r_mean"]) < 1e-3
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [".checkpoints.000001", "checkpoints", "log.csv", "log.json"]


@pytest.mark.slow   # trains the default model to its target on a study like the embedded one
@pytest.mark.background(**PLANTED_RUN)
def test_planted_truth(tmp_path, cache, background):
    """With the default options, the best checkpoint's test-block prediction of the subject average correlates >= 0.8
    with the planted noise-free signal (mean voxel r over responsive voxels, roi > 0), and its headline test r
    beats himalaya's ridge fitted on the same training block (the banded ridge is reported, not asserted)."""
    cfg = TrainConfig.make(cache_dir=str(cache), **PLANTED_RUN)
    background.wait()
    data = prepare_data(cfg)
    tr = Trainer(data, cfg, tmp_path)
    tr.fit()
    tr.model.load_state_dict(load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]["state_dict"])
    m = evaluate_run(tr.predict, tr.data, tr.cfg, truth=study_truth(tr.data.data_dir))["metrics"]
    assert m["truth_n_responsive"] > 50
    assert m["truth_r_responsive_mean"] >= 0.8, m
    assert m["block"] == "test" and m["headline"]["n_selected"] > 50
    assert m["test_voxel_r_selected"] > m["ridge_test_voxel_r_selected"], m


def _agree(out:Path):
    "The run folder as a reader sees it: the checkpoints and the log belong to one finished save."
    ck = out / "checkpoints"
    if not (ck / "last.pt").exists():
        assert not (out / "log.csv").exists() and not (out / "log.json").exists(); return 0
    last = load_checkpoint(ck / "last.pt")
    log = json.loads((out / "log.json").read_text())
    assert [h["epoch"] for h in log] == [h["epoch"] for h in last["history"]] == list(range(1, last["epoch"] + 1))
    assert len(pd.read_csv(out / "log.csv")) == last["epoch"]
    assert load_checkpoint(ck / "best.pt")["epoch"] == last["best_epoch"]
    assert json.loads((ck / "config.json").read_text()) == last["config"]
    return last["epoch"]


@pytest.mark.parametrize("step", ["torch.save", "best link", "log", "link move", "old folder removal"])
def test_a_kill_at_any_step_of_save_leaves_checkpoints_and_log_in_agreement(tmp_path, cache, study, data, monkeypatch, step):
    "A kill at each step of the second epoch's save: readers see epoch 1 or epoch 2 whole, and resume finishes the run exactly."
    cfg = cfg_for(cache, study, epochs=3)
    Trainer(data, cfg, tmp_path).fit(until_epoch=1)
    real, calls = C._drop_old, []
    def kill(*a, **k):
        calls.append(a)   # the old folders are also swept before a save: that first sweep goes through
        if step == "old folder removal" and len(calls) == 1: return real(*a)
        raise KeyboardInterrupt(f"killed at {step}")
    target = {"torch.save": (T.torch, "save"), "best link": (C, "_link_best"), "log": (C, "write_log"),
              "link move": (C, "_point"), "old folder removal": (C, "_drop_old")}[step]
    monkeypatch.setattr(*target, kill)
    with pytest.raises(KeyboardInterrupt): Trainer(data, cfg, tmp_path).resume().fit(until_epoch=2)
    monkeypatch.undo()
    assert _agree(tmp_path) == (2 if step == "old folder removal" else 1)
    tr = Trainer(data, cfg, tmp_path).resume()
    tr.fit()
    assert _agree(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoints.000003", "checkpoints", "log.csv", "log.json"]
    straight = Trainer(data, cfg, tmp_path / "straight"); straight.fit()
    for (name, a), b in zip(straight.model.state_dict().items(), tr.model.state_dict().values()): assert torch.equal(a, b), name


def test_a_run_folder_of_the_older_layout_is_resumed(tmp_path, cache, study, data):
    "A run folder with a real checkpoints/ folder and log files (the layout before checkpoint folders) resumes and moves over."
    cfg = cfg_for(cache, study, epochs=2)
    Trainer(data, cfg, tmp_path).fit(until_epoch=1)
    ck = tmp_path / "checkpoints"
    real = tmp_path / "old"; real.mkdir()
    for f in ck.iterdir(): (real / f.name).write_bytes(f.read_bytes())
    for f in ("log.csv", "log.json"): (tmp_path / f).unlink(); (tmp_path / f).write_text((real / f).read_text()); (real / f).unlink()
    for p in tmp_path.glob(".checkpoints.*"): __import__("shutil").rmtree(p)
    ck.unlink(); real.rename(ck)
    assert ck.is_dir() and not ck.is_symlink()
    Trainer(data, cfg, tmp_path).resume().fit()
    assert ck.is_symlink() and _agree(tmp_path) == 2


@pytest.mark.slow   # two fresh processes and a 6 s wait
def test_ranks_wait_for_rank_0_past_the_collective_timeout(tmp_path):
    "Two gloo processes with a 3 s collective timeout: rank 0 builds for 6 s while rank 1 waits, and neither times out."
    import socket
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    script = textwrap.dedent("""
        import os, sys, time
        from datetime import timedelta
        import torch.distributed as dist
        from giblet.training.distributed import DistInfo, main_first
        dist.init_process_group("gloo", timeout=timedelta(seconds=3))
        di = DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank())
        order = []
        def build():
            if di.main: time.sleep(6)          # a cache build longer than the collective timeout
            order.append(time.time()); return di.rank
        assert main_first(di, build) == di.rank
        dist.barrier()                          # both are here: the group still works
        print("done", di.rank, order[0], flush=True)
        dist.destroy_process_group()
    """)
    env = lambda r: dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                         OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    t = {int(o.split()[1]): float(o.split()[2]) for o, _ in outs}
    assert t[1] >= t[0]                         # rank 1 read only after rank 0 had built


def test_linear_path_is_standardised_on_the_training_block_only(cache, study, data):
    "The linear path's feature statistics come from the training TRs: other TRs' frames can't move them."
    import copy
    over = dict(FAST["model_overrides"], linear_delay=6.0, linear_grid=[4, 2])
    tr = Trainer(data, cfg_for(cache, study, epochs=1, model_overrides=over))
    lin = tr.model.encoder.linear
    train = data.split.train
    x = lin.raw(data.tensors.gather(torch.as_tensor(train), 1)).flatten(0, 1).double()
    np.testing.assert_allclose(lin.mean.numpy(), x.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(tr.ema["encoder.linear.mean"], lin.mean)   # the averaged weights that are saved hold them too
    poisoned = copy.copy(data)
    poisoned.tensors = copy.copy(data.tensors)
    held = np.setdiff1d(np.arange(len(data.tensors.video)), train)
    poisoned.tensors.video = data.tensors.video.clone()
    poisoned.tensors.video[torch.as_tensor(held)] = 255
    tr2 = Trainer(poisoned, cfg_for(cache, study, epochs=1, model_overrides=over))
    assert torch.equal(tr2.model.encoder.linear.mean, lin.mean) and torch.equal(tr2.model.encoder.linear.std, lin.std)
    poisoned.tensors.video[torch.as_tensor(train[:5])] = 255   # a training TR does move them
    tr3 = Trainer(poisoned, cfg_for(cache, study, epochs=1, model_overrides=over))
    assert not torch.equal(tr3.model.encoder.linear.mean, lin.mean)


def test_tiny_runs_keep_every_modality_while_training():
    "The tiny preset's run default has no modality dropout (it cost the linear factors; see Choosing the defaults): fusion in training mode is fusion in eval mode."
    from giblet.models.encoder import Fusion, ModelConfig
    cfg = ModelConfig.preset("tiny", **TrainConfig().model.model_overrides)
    torch.manual_seed(0)
    fusion = Fusion(cfg)
    feats = {m: torch.randn(64, 4, d) for m, d in dict(video=cfg.video_dim, audio=cfg.audio_dim, text=cfg.text_hidden).items()}
    with torch.no_grad(): trained, evaluated = fusion.train()(feats, 64, 4), fusion.eval()(feats, 64, 4)
    assert torch.equal(trained, evaluated)


def test_skips_that_leave_no_tr_in_a_window_are_refused(cache, study, data):
    "skip_first (or skip_last) as long as the model's window is a clear error, not a NaN gradient mid-run."
    from giblet.training.data import model_config
    assert model_config(cfg_for(cache, study, skip_first=7), data).context_trs == 8
    for k in ("skip_first", "skip_last"):
        with pytest.raises(ValueError, match=f"{k}=8 leaves no TR of the model's 8-TR windows"): model_config(cfg_for(cache, study, **{k: 8}), data)
