"""Larger checks of giblet.training.metrics: scores, noise ceiling on simulated subjects, ridge baseline, leakage."""
import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from giblet.training.metrics import (ceiling_from_r, delay_features, fit_ridge, intersubject_r, noise_ceiling,
                                     report_table, ridge_baseline, stimulus_features, voxel_r, voxel_r2)


# ---------------------------------------------------------------- voxelwise scores
def test_voxel_scores_match_references_across_chunks():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((40, 9000)).astype(np.float32)      # more voxels than one scoring chunk
    p = (0.5 * t + rng.standard_normal(t.shape)).astype(np.float32) + 10.0
    ref = np.array([np.corrcoef(p[:, i], t[:, i])[0, 1] for i in range(0, 9000, 97)])
    assert np.allclose(voxel_r(p, t)[::97], ref, atol=1e-6)
    assert np.allclose(voxel_r2(p, t), r2_score(t, p, multioutput="raw_values"), atol=1e-5)
    assert voxel_r(p, t).dtype == np.float32


def test_voxel_r_keeps_trailing_shape_and_torch_device_dtype():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((30, 4, 5))
    p = t + rng.standard_normal(t.shape)
    r = voxel_r(p, t)
    assert r.shape == (4, 5)
    rt = voxel_r(torch.from_numpy(p), torch.from_numpy(t))              # float64 stays float64
    assert rt.dtype == torch.float64 and np.allclose(rt.numpy(), r, atol=1e-6)
    mixed = voxel_r(torch.from_numpy(p).float(), t)                      # mixed inputs become tensors
    assert isinstance(mixed, torch.Tensor) and np.allclose(mixed.numpy(), r, atol=1e-5)
    assert voxel_r(p[:, 0, 0], t[:, 0, 0]).shape == ()


def test_constant_voxels_get_fill_in_numpy_and_torch():
    rng = np.random.default_rng(2)
    t = rng.standard_normal((20, 3)).astype(np.float32)
    p = t.copy(); p[:, 1] = 0.1                                          # constant prediction
    t2 = t.copy(); t2[:, 2] = 7.0                                        # constant truth
    for fn in (voxel_r, voxel_r2):
        out = fn(p, t2, fill=np.nan)
        assert np.isnan(out[2]) and np.isfinite(out[0])
        assert fn(p, t2)[2] == 0.0
        assert float(fn(torch.from_numpy(p), torch.from_numpy(t2))[2]) == 0.0
    assert voxel_r(p, t)[1] == 0.0 and voxel_r2(p, t)[1] < 0             # R² of a constant prediction is still defined


def test_voxel_score_errors():
    with pytest.raises(ValueError, match="same shape"): voxel_r(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="at least 2 TRs"): voxel_r2(np.zeros((1, 2)), np.zeros((1, 2)))


# ---------------------------------------------------------------- noise ceiling
def _subjects(n_sub, n_trs, q, seed=0):
    "Shared unit-variance signal plus independent noise of variance q (per voxel) in each subject."
    rng = np.random.default_rng(seed)
    sig = rng.standard_normal((n_trs, len(q))).astype(np.float32)
    noise_sd = np.sqrt(q).astype(np.float32)
    return np.stack([sig + noise_sd * rng.standard_normal(sig.shape, dtype=np.float32) for _ in range(n_sub)])


@pytest.mark.parametrize("method", ["loo", "split_half"])
def test_noise_ceiling_matches_analytical_value_at_sherlock_shape(method):
    q_levels = np.array([0.25, 1.0, 4.0, 12.0])
    q = np.repeat(q_levels, 150)
    sb = _subjects(17, 946, q, seed=3)                                    # 17 subjects, 946 TRs (halves 8 / 9)
    est = noise_ceiling(sb, method=method).reshape(4, -1)
    assert np.allclose(est.mean(1), 1 / np.sqrt(1 + q_levels / 17), atol=0.01)
    single = noise_ceiling(sb, method=method, target="subject").reshape(4, -1)
    assert np.allclose(single.mean(1), 1 / np.sqrt(1 + q_levels), atol=0.015)


def test_pooled_agreement_recovers_low_ceilings():
    q_levels = np.array([30.0, 80.0])                                     # single-subject reliability ~0.03 to 0.01
    sb = _subjects(17, 946, np.repeat(q_levels, 300), seed=4)
    for method in ("loo", "split_half"):
        r, a, b = intersubject_r(sb, method)
        assert (a, b) == ((1, 16) if method == "loo" else (8, 9))
        pooled = ceiling_from_r(r.reshape(2, -1).mean(1), a, b, 17)
        assert np.allclose(pooled, 1 / np.sqrt(1 + q_levels / 17), atol=0.03)


def test_ceiling_from_r_is_spearman_brown_for_equal_halves():
    r = np.linspace(0.05, 0.95, 10)
    assert np.allclose(ceiling_from_r(r, 4, 4, 8) ** 2, 2 * r / (1 + r), atol=1e-6)
    assert np.allclose(ceiling_from_r(r, 4, 4, 4) ** 2, r, atol=1e-6)    # one half's own reliability
    assert np.isnan(ceiling_from_r([np.nan], 1, 5, 6)[0])


class _Lazy:
    "A loader that only produces one subject when indexed (like a decoded cache)."
    def __init__(self, arr): self.arr, self.seen = arr, []
    def __len__(self): return len(self.arr)
    def __getitem__(self, i): self.seen.append(i); return self.arr[i].astype(np.float16).astype(np.float32)


def test_noise_ceiling_accepts_memmap_list_tensor_and_lazy_loader(tmp_path):
    sb = _subjects(5, 120, np.full(300, 2.0), seed=5).astype(np.float16).astype(np.float32)
    mm = np.lib.format.open_memmap(tmp_path / "bold.npy", mode="w+", dtype=np.float32, shape=sb.shape)
    mm[:] = sb; mm.flush()
    ref = noise_ceiling(sb)
    for src in (np.load(tmp_path / "bold.npy", mmap_mode="r"), list(sb), torch.from_numpy(sb)):
        assert np.allclose(noise_ceiling(src), ref, atol=1e-6)
    lazy = _Lazy(sb)
    assert np.allclose(noise_ceiling(lazy), ref, atol=1e-6)
    assert sorted(set(lazy.seen)) == list(range(5))                     # only single subjects were requested


def test_noise_ceiling_streams_without_copying_the_whole_array(tmp_path):
    n_sub, n_trs, n_vox = 12, 200, 20000
    mm = np.lib.format.open_memmap(tmp_path / "bold.npy", mode="w+", dtype=np.float32, shape=(n_sub, n_trs, n_vox))
    rng = np.random.default_rng(6)
    for i in range(n_sub): mm[i] = rng.standard_normal((n_trs, n_vox), dtype=np.float32)
    mm.flush(); del mm
    src = np.load(tmp_path / "bold.npy", mmap_mode="r")
    subject = n_trs * n_vox * 4                                          # 16 MB; the whole array is 12 times that
    for method in ("loo", "split_half"):
        tracemalloc.start()
        noise_ceiling(src, method=method, n_splits=2)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 5 * subject, f"{method}: peak {peak / 1e6:.0f} MB, one subject is {subject / 1e6:.0f} MB"


def test_noise_ceiling_errors():
    sb = _subjects(3, 20, np.ones(4))
    sb[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="subject 1 holds NaN"): noise_ceiling(sb)
    with pytest.raises(ValueError, match="subject 1 has shape"): noise_ceiling([sb[0], sb[1, :10], sb[2]])
    with pytest.raises(ValueError, match="method"): noise_ceiling(np.zeros((3, 5, 2)), method="odd_even")
    with pytest.raises(ValueError, match=r"\(n_subjects, n_trs, n_voxels\)"): noise_ceiling(np.zeros((5, 2)))


# ---------------------------------------------------------------- ridge baseline
def _planted(n_trs, p, noise_sd, seed, design="fir", run_ids=None):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_trs, p))
    if design == "fir":
        d = delay_features(x, (1, 2, 3, 4), run_ids)
    else:
        from scipy.signal import fftconvolve
        from giblet.alignment.hrf import hrf_kernel                      # the Glover HRF at lags 0, TR, 2 TR, ...
        d = fftconvolve(x, hrf_kernel(1.5)[:, None], axes=0)[:n_trs]
    w = rng.standard_normal((d.shape[1], len(noise_sd))) / np.sqrt(d.shape[1])
    sig = d @ w
    sig = sig / sig.std(0)
    return x, (sig + noise_sd * rng.standard_normal(sig.shape)).astype(np.float32), sig


def test_ridge_reaches_the_best_r_on_a_planted_delayed_map():
    noise = np.repeat([0.3, 1.0], 40)
    x, y, sig = _planted(1200, 5, noise, seed=7)
    train, val = np.arange(0, 900), np.arange(914, 1200)
    r, fit = ridge_baseline(x, y, train, val)
    best = 1 / np.sqrt(1 + noise ** 2)                                   # signal variance is 1 by construction
    assert np.allclose([r[:40].mean(), r[40:].mean()], [best[0], best[-1]], atol=0.02)
    assert voxel_r(fit.predict(x, val), sig[val]).mean() > 0.97          # the map itself is recovered
    assert fit.coef.shape == (fit.vt.shape[0], 80) and fit.vt.shape[1] == 20


def test_ridge_hrf_design_recovers_an_hrf_convolved_map():
    noise = np.full(30, 0.5)
    x, y, sig = _planted(800, 4, noise, seed=8, design="hrf")
    r, fit = ridge_baseline(x, y, np.arange(0, 600), np.arange(614, 800), design="hrf")
    assert fit.vt.shape[1] == 4
    assert abs(r.mean() - 1 / np.sqrt(1.25)) < 0.02


@pytest.mark.parametrize("n_trs,p", [(300, 10), (120, 60)])                # more TRs than columns, and fewer
def test_ridge_equals_scikit_learn_for_a_fixed_alpha(n_trs, p):
    from sklearn.linear_model import Ridge
    rng = np.random.default_rng(14)
    x, y = rng.standard_normal((n_trs, p)), rng.standard_normal((n_trs, 7)).astype(np.float32)
    train = np.arange(int(0.7 * n_trs))
    for alpha in (0.5, 30.0, 1e4):
        fit = fit_ridge(x, y, train, alphas=[alpha])
        z = fit.design_matrix(x)
        assert np.allclose(z[train].mean(0), 0, atol=1e-9) and np.allclose(z[train].std(0), 1, atol=1e-9)
        ref = Ridge(alpha=alpha).fit(z[train], y[train])
        assert np.allclose(fit.weights(), ref.coef_.T, atol=1e-5 * max(1, np.abs(ref.coef_).max()))
        assert np.allclose(fit.predict(x), ref.predict(z), atol=1e-4)


def test_cross_validation_picks_larger_alpha_for_noisier_data():
    xs, clean, _ = _planted(700, 20, np.full(50, 0.2), seed=9)
    _, noisy, _ = _planted(700, 20, np.full(50, 3.0), seed=9)
    train = np.arange(500)
    a_clean, a_noisy = (fit_ridge(xs, y, train).alpha for y in (clean, noisy))
    assert np.median(a_noisy) >= 30 * np.median(a_clean)
    g_clean, g_noisy = (fit_ridge(xs, y, train, alpha_per_voxel=False).alpha for y in (clean, noisy))
    assert len(np.unique(g_clean)) == 1 and len(np.unique(g_noisy)) == 1 and g_noisy[0] > g_clean[0]


def _same_fit(a, b):
    for k in ("feat_mean", "design_mean", "design_scale", "vt", "coef", "y_mean", "alpha", "cv_r2"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)


@pytest.mark.parametrize("design", ["fir", "hrf"])
def test_validation_trs_never_touch_the_fit(design):
    runs = np.repeat([0, 1, 2], 200)
    x, y, _ = _planted(600, 6, np.full(40, 1.0), seed=10)
    val = np.arange(250, 350)                                            # a held-out block inside run 1
    train = np.setdiff1d(np.arange(600), np.arange(236, 364))            # 14-TR gaps around it
    fit = fit_ridge(x, y, train, run_ids=runs, design=design)
    y_bad = y.copy(); y_bad[val] = np.nan                                # validation BOLD is never even read
    y_bad[np.arange(236, 250)] = 1e6                                     # nor is the gap
    fit_bad = fit_ridge(x, y_bad, train, run_ids=runs, design=design)
    _same_fit(fit, fit_bad)
    if design == "fir":                                                  # FIR rows reach 4 TRs back: not into val
        x_bad = x.copy(); x_bad[val] = -50.0
        _same_fit(fit, fit_ridge(x_bad, y, train, run_ids=runs))
    y_tr = y.copy(); y_tr[train[:5]] += 1.0                              # the test can see a change in training BOLD
    assert not np.array_equal(fit_ridge(x, y_tr, train, run_ids=runs, design=design).coef, fit.coef)


def test_delays_respect_runs_and_torch_bold_matches_numpy():
    runs = np.repeat([0, 1], 300)
    x, y, _ = _planted(600, 4, np.full(20, 0.5), seed=11, run_ids=runs)
    d = delay_features(x, (1, 2, 3, 4), runs)
    assert (d[300:304].reshape(4, 4, 4)[np.triu_indices(4)] == 0).all()  # delay k > row: zero at the run start
    assert np.array_equal(d[304, :4], x[303]) and np.array_equal(d[304, 12:], x[300])
    train, val = np.arange(0, 450), np.arange(464, 600)
    r_np, fit_np = ridge_baseline(x, y, train, val, run_ids=runs)
    r_t, fit_t = ridge_baseline(x, torch.from_numpy(y), train, val, run_ids=runs)
    assert np.allclose(r_np, r_t, atol=1e-5) and np.allclose(fit_np.coef, fit_t.coef, atol=1e-5)
    assert r_np.mean() > 0.85


def test_ridge_errors():
    x, y, _ = _planted(100, 3, np.ones(4), seed=12)
    with pytest.raises(ValueError, match="overlap"): ridge_baseline(x, y, np.arange(60), np.arange(50, 100))
    with pytest.raises(ValueError, match="too few"): fit_ridge(x, y, np.arange(20))
    with pytest.raises(ValueError, match="design"): fit_ridge(x, y, np.arange(80), design="spline")
    with pytest.raises(ValueError, match="bold must be"): fit_ridge(x, y[:50], np.arange(40))
    with pytest.raises(ValueError, match="train_idx"): fit_ridge(x, y, np.arange(90, 110))


# ---------------------------------------------------------------- stimulus features and report
def test_stimulus_features_shapes_and_chunking():
    rng = np.random.default_rng(13)
    video = rng.integers(0, 256, (5, 3, 90, 160, 3), dtype=np.uint8)
    audio = rng.standard_normal((5, 128, 19)).astype(np.float32)
    text = rng.standard_normal((5, 32)).astype(np.float32)
    f = stimulus_features(video, audio, text)
    assert f.shape == (5, 3 * 144 + 144 + 2 * 128 + 32) and f.dtype == np.float32
    assert np.allclose(f, stimulus_features(video, audio, text, chunk=2), atol=1e-6)
    assert np.allclose(f[:, :432].reshape(5, 3, 9, 16)[:, :, 0, 0],
                       video[:, :, :10, :10].reshape(5, -1, 3).mean(1) / 255, atol=1e-5)
    assert np.array_equal(stimulus_features(text=text), text)
    with pytest.raises(ValueError, match=">= 2 frames"): stimulus_features(video[:, :1])
    with pytest.raises(ValueError, match="uint8"): stimulus_features(video.astype(np.float32))
    with pytest.raises(ValueError, match="at least one"): stimulus_features()


def test_report_table_rois_nan_and_names():
    model = torch.tensor([0.2, np.nan, 0.4, 0.6, 0.8])
    t = report_table(model, np.array([0.1, 0.1, 0.2, 0.3, 0.4]), None, np.array([0, 2, 2, 5, 5]),
                     {2: "auditory", 5: "language"})
    assert list(t.columns) == ["model_mean", "model_median", "ridge_mean", "ridge_median", "n_voxels"]
    assert list(t.index) == ["all", "auditory", "language"] and t.index.name == "region"
    assert np.isclose(t.loc["all", "model_mean"], 0.5) and np.isclose(t.loc["auditory", "model_median"], 0.4)
    assert t.loc["language", "n_voxels"] == 2
    assert list(report_table(ceiling=[0.5, 0.6], roi_labels=[1, 3]).index) == ["all", "roi 1", "roi 3"]
    with pytest.raises(ValueError, match="no name for ROI label"): report_table([0.1], roi_labels=[4], roi_names=["a"])
    with pytest.raises(ValueError, match="alike"): report_table([0.1, 0.2], [0.1])
