"""Shared pytest setup: a headless matplotlib backend, the repository root, the `slow` marker, and the small synthetic
study that the end-to-end tests share (one cache folder per session).

Two lanes: `pytest tests -m "not slow"` is the fast lane (with `nbdev_test`); `pytest tests -m slow` runs the tests that
train a model to a target, start fresh kernels and processes (papermill, torchrun, console scripts) or render the docs."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")
ROOT = Path(__file__).resolve().parents[1]

# The small study shared by tests/test_trainer.py, test_cli.py, test_evaluation.py and test_report.py (one cache per session).
SMALL = dict(n_subjects=2, n_trs=160, seed=0, shape=[14, 17, 14], size=[64, 36])
# Two quick epochs of the tiny model on it.
FAST = dict(preset="tiny", device="cpu", progress=False, batch_size=8, decode_from="both", recon_frac=0.5, patience=0, stride=3,
            skip_first=3, val_frac=0.2, test_frac=0.3, epochs=2,
            model_overrides=dict(context_trs=8, temporal_kernel=6, brain_rank=4))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains to a target, starts fresh kernels and processes, or renders the docs; "
                                       "the slow lane is `pytest tests -m slow`, the fast lane `pytest tests -m \"not slow\"`")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    "A feature and synthetic-data cache shared by the test modules of this session."
    return tmp_path_factory.getbasetemp() / "giblet-cache"


@pytest.fixture(scope="session")
def study(cache) -> Path:
    "The small synthetic study `SMALL` (generated once per session, into `cache`)."
    from giblet.synthetic_truth import embedded_dataset
    return embedded_dataset(cache, **SMALL)
