"""giblet.alignment.hrf: equality with nilearn, causality and peak timing over many TRs, every layout and dtype."""
import math
import warnings

import numpy as np
import pytest
import torch
from nilearn.glm.first_level import glover_hrf as nilearn_glover_hrf
from scipy.signal import lfilter

from giblet.alignment.hrf import convolve_hrf, glover_hrf, hrf_kernel

TRS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def reference(x, tr, axis=0):
    "Direct causal convolution in float64: the full convolution truncated to the input length."
    return lfilter(hrf_kernel(tr), [1.0], np.asarray(x, np.float64), axis=axis)


# --- glover_hrf ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("oversampling", [1, 2, 3, 16, 50])
@pytest.mark.parametrize("onset", [0.0, 0.3, -0.5, 2.0])
@pytest.mark.parametrize("time_length", [20.0, 32.0, 40.0])
def test_glover_equals_nilearn(oversampling, onset, time_length):
    for tr in [*np.round(np.arange(0.3, 4.01, 0.1), 2), 0.72, 1.37, 2.2]:
        ours = glover_hrf(tr, oversampling, time_length, onset)
        ref = nilearn_glover_hrf(float(tr), oversampling, time_length, onset)
        assert ours.dtype == np.float64 and ours.shape == ref.shape
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_glover_defaults_and_errors():
    np.testing.assert_allclose(glover_hrf(1.5), nilearn_glover_hrf(1.5, 1, 32.0, 0.0), rtol=0, atol=1e-12)
    for bad in (0, -1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tr must be a positive"):
            glover_hrf(bad)
    with pytest.raises(TypeError, match="tr must be a number"):
        glover_hrf("fast")
    for bad in (0, 1.5, -2, True):
        with pytest.raises(ValueError, match="oversampling"):
            glover_hrf(1.5, oversampling=bad)


# --- hrf_kernel ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tr", [0.3, 0.5, 0.72, 1.0, 1.37, 1.5, 2.0, 2.2, 2.5, 3.0, 3.5])
def test_kernel_is_glover_at_whole_trs(tr):
    k = hrf_kernel(tr)
    assert k.dtype == np.float64 and len(k) == math.floor(32 / tr + 1e-9) + 1
    assert k[0] == 0.0 and abs(k.sum() - 1) < 1e-12
    ov = 400  # nilearn's own curve at 400x oversampling on its grid (linspace, shifted by one step), read at k*tr
    fine = nilearn_glover_hrf(tr, ov, 32.0)
    t = np.linspace(0, 32.0, len(fine)) - tr / ov
    ref = np.interp(np.arange(len(k)) * tr, t, fine, left=0.0)
    np.testing.assert_allclose(k, ref / ref.sum(), rtol=0, atol=5e-5)


def test_kernel_returns_a_private_copy():
    k = hrf_kernel(1.5)
    k[:] = 7
    assert hrf_kernel(1.5)[0] == 0.0


def test_kernel_too_long_tr():
    with pytest.raises(ValueError, match="needs at least 4 samples"):
        hrf_kernel(11.0)


# --- causality and timing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tr", TRS)
@pytest.mark.parametrize("at", [0, 1, 7, 20, 33, 100, 150])
def test_impulse_is_causal_and_peaks_in_range(tr, at):
    n = 160 + int(20 / tr)
    x = np.zeros((n, 3), np.float32)
    x[at, 1] = 1.0
    y = convolve_hrf(x, tr)
    assert np.all(y[: at + 1] == 0) and np.all(y[:, [0, 2]] == 0)  # nothing before or at the event
    assert 4.5 <= (np.argmax(y[:, 1]) - at) * tr <= 6.5


def in_documented_band(tr):
    "TRs whose whole-TR lag nearest the HRF's 5.0 s peak falls below 4.5 s (see the notebook)."
    return tr == 1.12 or 1.44 <= tr <= 1.49 or 2.02 <= tr <= 2.24


def test_peak_over_a_fine_tr_grid():
    """From TR 0.3 to 3.25 s: the peak is 4.5-6.5 s after the event except in the documented bands, and it is always
    one of the two whole-TR lags around the continuous Glover peak (5.0 s), never a TR further."""
    for tr in np.round(np.arange(0.3, 3.26, 0.01), 3):
        x = np.zeros(200 + int(40 / tr))
        x[10] = 1.0
        y = convolve_hrf(x, tr)
        assert np.all(y[:11] == 0)
        lag = (np.argmax(y) - 10) * tr
        assert math.floor(5.0 / tr) * tr - 1e-9 <= lag <= math.ceil(5.0 / tr) * tr + 1e-9, tr
        assert (4.5 <= lag <= 6.5) != in_documented_band(tr), (tr, lag)


def test_sustained_stimulus_settles_at_one():
    y = convolve_hrf(np.ones(200), 1.5)
    np.testing.assert_allclose(y[-50:], 1.0, atol=1e-12)


# --- equality with a direct convolution, every layout ------------------------------------------------------------------

@pytest.mark.parametrize("tr", [0.5, 1.5, 3.0])
def test_lengths_around_block_edges(tr):
    rng = np.random.default_rng(1)
    c = len(hrf_kernel(tr)) - 1
    b = max(8, c // 2)
    for n in sorted({1, 2, 3, c - 1, c, c + 1, c + b - 1, c + b, c + b + 1, 2 * c + 3, 3 * b + c + 5, 500}):
        x = rng.standard_normal((n, 4))
        np.testing.assert_allclose(convolve_hrf(x, tr), reference(x, tr), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,axis", [((300, 257), 0), ((257, 300), 1), ((257, 300), -1), ((4, 300, 9), 1),
                                        ((2, 3, 300, 5), 2), ((300,), 0), ((300, 1), 0), ((1, 300), 1),
                                        ((50, 12, 7), 1), ((3, 300), -1)])
def test_layouts_match_reference(shape, axis):
    x = np.random.default_rng(2).standard_normal(shape)
    y = convolve_hrf(x, 1.5, axis)
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == x.dtype and y.flags.c_contiguous
    np.testing.assert_allclose(y, reference(x, 1.5, axis), rtol=0, atol=1e-12)


def test_strided_and_foreign_numpy_inputs(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((200, 30))
    ref = reference(base, 1.5)
    for x in (np.asfortranarray(base), base[::-1][::-1], np.ascontiguousarray(base[::-1])[::-1]):
        np.testing.assert_allclose(convolve_hrf(x, 1.5), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(convolve_hrf(base[::2], 1.5), reference(base[::2], 1.5), rtol=0, atol=1e-12)
    np.testing.assert_allclose(convolve_hrf(base[:, ::3], 1.5), reference(base[:, ::3], 1.5), rtol=0, atol=1e-12)
    big = base.astype(">f8")
    y = convolve_hrf(big, 1.5)
    assert y.dtype == big.dtype
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)
    np.save(tmp_path / "x.npy", base.astype(np.float32))
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = convolve_hrf(mm, 1.5)
    assert type(y) is np.ndarray and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)


def test_input_is_not_modified_and_output_is_new():
    x = np.random.default_rng(4).standard_normal((100, 5)).astype(np.float32)
    before = x.copy()
    y = convolve_hrf(x, 1.5)
    np.testing.assert_array_equal(x, before)
    assert not np.shares_memory(x, y) and y.flags.writeable


def test_float16_float32():
    x = np.random.default_rng(5).standard_normal((120, 6))
    for dt, tol in ((np.float32, 1e-5), (np.float16, 1e-2)):
        y = convolve_hrf(x.astype(dt), 1.5)
        assert y.dtype == dt
        np.testing.assert_allclose(y.astype(np.float64), reference(x.astype(dt), 1.5), rtol=0, atol=tol)


def test_empty():
    for shape in ((0, 5), (5, 0), (0,)):
        y = convolve_hrf(np.zeros(shape, np.float32), 1.5)
        assert y.shape == shape and y.dtype == np.float32
    t = convolve_hrf(torch.zeros(2, 0, 3), 1.5, axis=1)
    assert t.shape == (2, 0, 3)


def test_errors():
    with pytest.raises(TypeError, match="floating-point"):
        convolve_hrf(np.arange(10), 1.5)
    with pytest.raises(TypeError, match="floating-point"):
        convolve_hrf(np.zeros(10, complex), 1.5)
    with pytest.raises(TypeError, match="floating-point"):
        convolve_hrf(torch.arange(10), 1.5)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        convolve_hrf([0.0, 1.0], 1.5)
    with pytest.raises(ValueError, match="at least one dimension"):
        convolve_hrf(np.ones(()), 1.5)
    for axis in (2, -3, 1.0, True):
        with pytest.raises(ValueError, match="axis must be an integer"):
            convolve_hrf(np.zeros((5, 5)), 1.5, axis=axis)
    with pytest.raises(ValueError, match="tr must be a positive"):
        convolve_hrf(np.zeros(5), 0.0)
    with pytest.raises(ValueError, match="needs at least 4 samples"):
        convolve_hrf(np.zeros(5), 20.0)


# --- torch -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 2e-2),
                                       (torch.bfloat16, 1e-1)])
def test_torch_dtypes(dtype, tol):
    x = torch.randn(3, 90, 4, generator=torch.Generator().manual_seed(0))
    y = convolve_hrf(x.to(dtype), 1.5, axis=1)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.shape == x.shape and y.device == x.device
    np.testing.assert_allclose(y.double().numpy(), reference(x.to(dtype).double().numpy(), 1.5, 1), rtol=0, atol=tol)


@pytest.mark.parametrize("shape", [(4, 30, 6), (2, 300, 5), (64, 16, 40)])
def test_batch_layout_with_autograd(shape):
    "(B, T, V) with axis=1, both for long series (blocks per series) and for many short ones (series per block)."
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = convolve_hrf(x, 1.5, axis=1)
    assert y.requires_grad and y.shape == x.shape
    np.testing.assert_allclose(y.detach().numpy(), reference(x.detach().numpy(), 1.5, 1), rtol=0, atol=1e-12)
    g = torch.randn(shape, dtype=torch.float64)
    (y * g).sum().backward()
    # the gradient of a causal convolution is the anti-causal one: convolve the time-reversed upstream gradient
    expect = reference(g.numpy()[:, ::-1], 1.5, 1)[:, ::-1]
    np.testing.assert_allclose(x.grad.numpy(), expect, rtol=0, atol=1e-12)


def test_gradcheck_small():
    for shape, axis in (((2, 40, 3), 1), ((40,), 0), ((3, 40), -1)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: convolve_hrf(t, 1.5, axis=axis), (x,))


def test_in_a_module():
    class Predict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 8)

        def forward(self, x):  # (B, T, features) -> (B, T, voxels)
            return convolve_hrf(self.lin(x), 1.5, axis=1)

    torch.manual_seed(0)
    m = Predict()
    x, target = torch.randn(4, 60, 5), torch.randn(4, 60, 8)
    loss = torch.nn.functional.mse_loss(m(x), target)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.no_grad():
        assert not m(x).requires_grad
    with torch.inference_mode():
        assert m(x).shape == (4, 60, 8)


def test_torch_noncontiguous_and_no_grad():
    x = torch.randn(40, 200, dtype=torch.float64).T  # (200, 40), time first, not contiguous
    np.testing.assert_allclose(convolve_hrf(x, 2.0).numpy(), reference(x.numpy(), 2.0), rtol=0, atol=1e-12)
    xg = torch.randn(200, 3, requires_grad=True)
    with torch.no_grad():
        assert not convolve_hrf(xg, 1.5).requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stays_on_device():
    x = torch.randn(3, 400, 50, device="cuda")
    y = convolve_hrf(x, 1.5, axis=1)
    assert y.device == x.device and y.dtype == x.dtype
    np.testing.assert_allclose(y.cpu().double().numpy(), reference(x.cpu().numpy(), 1.5, 1), rtol=0, atol=1e-4)
    xh = x.half().requires_grad_()
    convolve_hrf(xh, 1.5, axis=1).sum().backward()
    assert xh.grad.device == x.device and xh.grad.dtype == torch.float16
