"""Shared pytest setup: a headless matplotlib backend, the repository root, the `slow` marker, the small synthetic
study that the end-to-end tests share (one cache folder per session), and the `background` process that builds the larger
studies of the slow lane's long fixtures while the tests before them run.

Two lanes: `pytest tests -m "not slow"` is the fast lane (with `nbdev_test`); `pytest tests -m slow` runs the tests that
train a model to a target, start fresh kernels and processes (papermill, torchrun, console scripts) or render the docs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]

# The small study shared by tests/test_trainer.py, test_cli.py, test_evaluation.py and test_report.py (one cache per session).
SMALL = dict(n_subjects=2, n_trs=160, seed=0, shape=[14, 17, 14], size=[64, 36])
# How the end-to-end tests train: small batches, no early stop, a small temporal model and brain head.
QUICK = dict(batch_size=8, recon_frac=0.5, patience=0, skip_first=3, val_frac=0.2, test_frac=0.3,
             model_overrides=dict(context_trs=8, temporal_kernel=6, brain_rank=4))
# Two quick epochs of the tiny model on SMALL, in the test's process.
FAST = dict(QUICK, preset="tiny", device="cpu", progress=False, decode_from="both", stride=3, epochs=2)
# QUICK for the tests' own small studies, whose films are cut at 32 x 18 pixels (a giblet-train --config, mostly).
QUICK_32 = dict(QUICK, stride=4, progress=False, model_overrides=dict(QUICK["model_overrides"], frame_width=32, frame_height=18))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains to a target, starts fresh kernels and processes, or renders the docs; "
                                       "the slow lane is `pytest tests -m slow`, the fast lane `pytest tests -m \"not slow\"`")
    config.addinivalue_line("markers", "background(**options): the study and feature caches of `TrainConfig.make(**options)` in "
                                       "the session's `cache` are built by the `background` process from the session's start")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


def session_cache(tmp_path_factory) -> Path:
    "The session's feature and synthetic-data cache folder (the `cache` fixture; the `background` process writes there too)."
    return tmp_path_factory.getbasetemp() / "giblet-cache"


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    "A feature and synthetic-data cache shared by the test modules of this session."
    return session_cache(tmp_path_factory)


@pytest.fixture(scope="session")
def study(cache) -> Path:
    "The small synthetic study `SMALL` (generated once per session, into `cache`)."
    from giblet.synthetic_truth import embedded_dataset
    return embedded_dataset(cache, **SMALL)


class Background:
    "The process that builds the caches the selected tests' `background` markers name; `wait` before reading them."
    def __init__(self, proc:subprocess.Popen|None, log:Path): self.proc, self.log = proc, log

    def wait(self, timeout:float=1800):
        "Block until the caches are built; a failed build fails the test that waits, with the process's error."
        if self.proc is None: return
        try: rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait(); raise
        assert rc == 0, f"building the caches failed:\n{self.log.read_text()[-3000:]}"


@pytest.fixture(scope="session", autouse=True)
def background(request, tmp_path_factory):
    """One process, started with the session, builds (in order) the caches that the selected tests' `background` markers name:
    the slow lane runs one test at a time, so the study a long fixture reads is written on the core the tests before it leave
    idle. The caches are the ones the fixture would build itself (the same `study_data` call), so every test reads the same data."""
    options, cache = [], session_cache(tmp_path_factory)   # not the `cache` fixture, which a test module may replace with its own
    for item in request.session.items:
        for m in item.iter_markers("background"):
            o = dict(m.kwargs, cache_dir=str(cache), progress=False)
            if o not in options: options.append(o)
    script = ("import json, sys\nfrom giblet.training.config import TrainConfig\nfrom giblet.training.data import study_data\n"
              "for o in json.loads(sys.argv[1]): study_data(TrainConfig.make(**o))")
    log, proc = cache.parent / "background.log", None
    if options:
        with open(log, "w") as err:   # a file, not a pipe: nobody reads a pipe until the first wait, and a full one would stall it
            proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(options)], stdout=err, stderr=err)
    yield Background(proc, log)
    if proc is not None and proc.poll() is None: proc.kill(); proc.wait()
