"""The evaluation protocol: the test block never touches training, the himalaya baselines use delays in seconds and
training rows only, and the block bootstrap is what it says."""
import dataclasses

import numpy as np
import pytest
import torch

from giblet.baselines import fir_delays, fit_baselines, stimulus_bands
from giblet.evaluation import block_bootstrap, compare
from giblet.metrics import delay_features, voxel_r
from giblet.training.config import TrainConfig
from giblet.training.data import prepare_data, run_data
from giblet.training.trainer import Trainer

from conftest import FAST   # two epochs of the tiny model on the small study of the `cache` and `study` fixtures


# ---------------------------------------------------------------- the test block is untouched
def _weights(al, cfg):
    tr = Trainer(run_data(al, cfg), cfg)
    tr.fit()
    return {k: v.clone() for k, v in tr.model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_poisoned_test_block_leaves_the_trained_weights_bit_identical(cache, study):
    "Garbage in every test-block BOLD value, or in every test-block frame, mel and text, changes no trained weight."
    cfg = TrainConfig.make(**FAST, data_dir=str(study), cache_dir=str(cache))
    data = prepare_data(cfg)
    al, test, train = data.aligned, data.split.test, data.split.train
    assert len(test) >= 20 and test[0] - data.split.val[-1] > 21 and data.split.val[0] - train[-1] > 21
    clean = _weights(al, cfg)
    rng = np.random.default_rng(0)
    fmri = np.array(al.fmri, copy=True)
    fmri[:, test] = rng.normal(0, 1e4, fmri[:, test].shape)
    assert _same(clean, _weights(dataclasses.replace(al, fmri=fmri), cfg))
    video, audio, text = (np.array(x, copy=True) for x in (al.video, al.audio, al.text))
    video[test] = rng.integers(0, 256, video[test].shape, dtype=np.uint8)
    audio[test] = rng.normal(0, 50, audio[test].shape)
    text[test] = rng.normal(0, 5, text[test].shape)
    assert _same(clean, _weights(dataclasses.replace(al, video=video, audio=audio, text=text), cfg))
    fmri = np.array(al.fmri, copy=True)  # the check can fail: one poisoned training TR changes the weights
    fmri[:, train[len(train) // 2]] += 100.0
    assert not _same(clean, _weights(dataclasses.replace(al, fmri=fmri), cfg))


# ---------------------------------------------------------------- baselines
def _planted(n_trs, tr, lag_s, runs=None, seed=0, noise=0.5):
    "Two bands; voxels 0-9 follow band a, 10-19 band b, `lag_s` seconds later; band c is noise."
    rng = np.random.default_rng(seed)
    bands = {k: rng.standard_normal((n_trs, 6)).astype(np.float32) for k in "abc"}
    lag = round(lag_s / tr)
    sig = np.concatenate([delay_features(bands[k], (lag,), runs) @ rng.standard_normal((6, 10)) for k in "ab"], 1)
    sig /= sig.std(0)
    return bands, sig, (sig + noise * rng.standard_normal(sig.shape)).astype(np.float32)


@pytest.mark.parametrize("tr", [0.72, 2.0])
def test_fir_delays_in_seconds_cover_0_to_12_s(tr):
    "At TR 0.72 s and 2 s the FIR columns cover 0-12 s, and a response 11.5 s after the stimulus is found."
    d = fir_delays(tr)
    assert d[0] == 0 and d[-1] * tr >= 12 and (d[-1] - 1) * tr < 12 and (np.diff(d) == 1).all()
    n = 700 if tr < 1 else 400
    bands, sig, y = _planted(n, tr, 11.5)
    train, test = np.arange(0, int(0.7 * n)), np.arange(int(0.7 * n) + 20, n)
    fit = fit_baselines(bands, y[train], train, tr=tr, n_iter=5)
    assert fit.info["delays_trs"] == list(d) and fit.design.x.shape[1] == 3 * 6 * len(d)
    assert fit.info["delays_s"][-1] >= 12
    for name in ("banded_ridge", "ridge"):
        assert voxel_r(fit.predict(name, test), sig[test]).mean() > 0.7, name
    short = fit_baselines(bands, y[train], train, tr=tr, delays_s=(0.0, 6.0), n_iter=5)   # delays that stop short miss it
    assert voxel_r(short.predict("ridge", test), sig[test]).mean() < 0.3


def test_baselines_use_training_rows_only_and_respect_runs():
    runs = np.repeat([0, 1, 2], 200)
    bands, sig, y = _planted(600, 1.5, 4.5, runs, seed=3)
    train = np.r_[0:230, 370:600]                                       # a held-out block 252-347 inside run 1, 22-TR gaps
    fit = fit_baselines(bands, y[train], train, runs, tr=1.5, n_iter=5)
    x = fit.design.x
    first = fit.design.bands["a"]
    assert not x[200, first][6:].any() and not x[400, first][6:].any()  # delays > 0 are zero at each run start
    poisoned = {k: v.copy() for k, v in bands.items()}
    for v in poisoned.values(): v[252:348] = 1e3                        # held-out stimulus (delays reach 12 s < the gap)
    fit2 = fit_baselines(poisoned, y[train], train, runs, tr=1.5, n_iter=5)
    np.testing.assert_array_equal(fit2.design.x[train], x[train])
    for name in ("banded_ridge", "ridge"):
        np.testing.assert_array_equal(fit2.predict(name, train), fit.predict(name, train))
    with pytest.raises(ValueError, match="y_train must be"): fit_baselines(bands, y, train, runs)
    bad = dict(bands, a=np.where(np.arange(600)[:, None] == 5, np.nan, bands["a"]))
    with pytest.raises(ValueError, match="'a' holds NaN"): fit_baselines(bad, y[train], train, runs)


def test_stimulus_bands_of_a_study_and_extra_streams():
    rng = np.random.default_rng(1)
    video = rng.integers(0, 256, (6, 2, 18, 32, 3), dtype=np.uint8)
    b = stimulus_bands(video, rng.normal(size=(6, 4, 5)), np.zeros((6, 3)), np.zeros(6, bool), extra={"clip": np.ones((6, 2))})
    assert list(b) == ["video", "audio", "clip"]                         # no text band when no TR has text
    with pytest.raises(ValueError, match="given twice"): stimulus_bands(video, extra={"video": np.ones((6, 2))})


# ---------------------------------------------------------------- uncertainty
def test_block_bootstrap_equals_explicit_resampling():
    rng = np.random.default_rng(2)
    true = rng.standard_normal((50, 7)); pred = true + rng.standard_normal((50, 7))
    got = block_bootstrap({"p": pred}, true, block=5, n_boot=20, seed=4)["p"]
    starts = np.random.default_rng(4).integers(0, 50, (20, 10))             # the same draws: 10 blocks of 5 TRs
    idx = (starts[:, :, None] + np.arange(5)).reshape(20, -1) % 50
    want = [voxel_r(pred[i], true[i]).mean() for i in idx]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_compare_says_behind_when_the_model_is_worse():
    rng = np.random.default_rng(5)
    true = np.cumsum(rng.standard_normal((150, 40)), 0) * 0.1 + rng.standard_normal((150, 40))
    good, bad = true + rng.standard_normal(true.shape), true + 4 * rng.standard_normal(true.shape)
    c = compare(bad, {"banded_ridge": good}, true, np.ones(40, bool), tr=1.5, n_boot=300)
    d = c["differences"]["banded_ridge"]
    assert d["verdict"] == "behind" and d["ci_high"] < 0 < d["ci_low"] + 1 and c["block_trs"] == 14
    null = compare(rng.standard_normal(true.shape), {"banded_ridge": good}, true, np.ones(40, bool), tr=1.5, n_boot=100)["null"]
    assert null["p"] > 0.05                                               # an unrelated prediction is within its null
