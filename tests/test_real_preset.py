"""The `real` synthetic preset fails the way real BOLD fails (a high ceiling, features that explain little, slow drift),
and a run that starts from the ridge does not fall below it there: the guard against the real-data gap coming back."""
import json

import pytest

from giblet import cli
from giblet.synthetic import make_dataset

KW = dict(preset="real", n_subjects=6, n_trs=360, shape=(10, 12, 10), size=(32, 18))


@pytest.fixture(scope="module")
def study(tmp_path_factory): return make_dataset(tmp_path_factory.mktemp("real") / "study", **KW)


def train(study, out, *extra):
    argv = ["--data-dir", str(study.root), "--out", str(out), "--cache-dir", str(out.parent / "cache"), "--device", "cpu",
            "--epochs", "4", "--config", json.dumps(dict(progress=False)), *extra]
    return cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))


@pytest.mark.slow
def test_a_ridge_start_does_not_fall_below_the_ridge_on_the_real_preset(study, tmp_path):
    m = train(study, tmp_path / "rs", "--set", "ridge_start=true")
    assert m["noise_ceiling_test_selected"] > 0.5                      # reliable BOLD ...
    assert m["ridge_test_voxel_r_selected"] < 0.5 * m["noise_ceiling_test_selected"]   # ... that the features explain little of
    assert m["test_voxel_r_selected"] >= m["ridge_test_voxel_r_selected"] - 0.02
    assert m["stack_test_voxel_r_selected"] >= m["banded_ridge_test_voxel_r_selected"] - 0.02
