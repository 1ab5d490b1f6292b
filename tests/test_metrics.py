"""Larger checks of giblet.metrics: scores, noise ceiling on simulated subjects, FIR design, stimulus features."""
import tracemalloc

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

from giblet.metrics import (ceiling_from_r, delay_features, intersubject_r, noise_ceiling, stimulus_features, voxel_r,
                                     voxel_r2)


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


# ---------------------------------------------------------------- FIR design
def test_delays_respect_runs():
    runs = np.repeat([0, 1], 300)
    x = np.random.default_rng(11).standard_normal((600, 4))
    d = delay_features(x, (1, 2, 3, 4), runs)
    assert (d[300:304].reshape(4, 4, 4)[np.triu_indices(4)] == 0).all()  # delay k > row: zero at the run start
    assert np.array_equal(d[304, :4], x[303]) and np.array_equal(d[304, 12:], x[300])
    with pytest.raises(ValueError, match="non-negative"): delay_features(x, (-1, 2))


# ---------------------------------------------------------------- stimulus features
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
