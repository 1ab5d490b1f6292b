"""Decoding scores against the shifted null: a decoder that ignores its brain input, or reads it at the wrong time, fails them;
one that carries the stimulus passes. The null of a shifted brain series is the rolled decoding, away from the turn."""
import numpy as np
import pytest
import torch

from giblet.decoding import decode_block, decoding_scores, null_shifts, roll_decoded
from giblet.models.autoencoder import BrainAutoencoder
from giblet.models.encoder import ModelConfig

N, TR = 160, 1.5


@pytest.fixture(scope="module")
def study():
    "A planted block: slowly drifting frames, mel bands and 16 annotations, each held a few TRs."
    g = np.random.default_rng(1)
    slow = np.stack([np.convolve(g.standard_normal(N + 20), np.ones(8) / 8, "same")[10:-10] for _ in range(6)], 1)  # (N, 6)
    pix = g.standard_normal((6, 2 * 6 * 8 * 3))
    video = (np.clip(0.5 + 0.15 * (slow @ pix), 0, 1) * 255).astype(np.uint8).reshape(N, 2, 6, 8, 3)
    audio = (slow @ g.standard_normal((6, 8 * 4))).reshape(N, 8, 4) + 0.3 * g.standard_normal((N, 8, 4))
    lab = np.repeat(g.integers(0, 17, N // 5 + 1), 5)[:N]
    text = g.standard_normal((17, 16))[lab]
    return dict(video=video, audio=audio, text=text, has_text=lab > 0), g


def noisy(true, g, scale=1.0):
    "A decoder that carries the stimulus, with noise as large as the signal."
    v = true["video"] / 255.0
    return dict(video=np.clip(v + scale * v.std() * g.standard_normal(v.shape), 0, 1),
                audio=true["audio"] + scale * true["audio"].std() * g.standard_normal(true["audio"].shape),
                text=true["text"] + scale * g.standard_normal(true["text"].shape))


def test_real_decoder_passes_constant_and_late_ones_fail(study):
    true, g = study
    good = decoding_scores(noisy(true, g), true, TR, n_boot=200)
    assert good.above_null.all(), good
    assert (good["value"] > good["null_hi"]).all()
    const = {m: np.repeat(v[:1], N, 0).astype(np.float64) / (255.0 if m == "video" else 1) for m, v in true.items() if m != "has_text"}
    assert not decoding_scores(const, true, TR, n_boot=200).above_null.any()
    late = roll_decoded(noisy(true, g), 40)  # the right stimuli, 60 s out of step: no better than the null
    assert not decoding_scores(late, true, TR, n_boot=200).above_null.any()


def test_text_chance_and_counts(study):
    true, g = study
    t = decoding_scores(noisy(true, g), true, TR, n_boot=50)
    n_distinct = len(np.unique(true["text"][true["has_text"]], axis=0))
    assert t.loc[("text", "top1"), "chance"] == pytest.approx(1 / n_distinct)
    assert t.loc[("text", "top5"), "chance"] == pytest.approx(5 / n_distinct)
    assert t.loc[("text", "top1"), "n_trs"] == true["has_text"].sum()


def test_bad_input_is_named(study):
    true, g = study
    with pytest.raises(ValueError, match="bootstrap blocks"): decoding_scores(noisy(true, g), true, TR, block_s=10)
    with pytest.raises(ValueError, match="TRs"): decoding_scores({"audio": true["audio"][:-1]}, true, TR)
    with pytest.raises(ValueError, match="no circular shift"): null_shifts(30, TR)
    assert (null_shifts(N, TR) >= 20).all() and (null_shifts(N, TR) <= N - 20).all()


def test_shifted_brain_is_the_rolled_decoding_away_from_the_turn():
    "The cheap null (rolling the decoded arrays) is what decoding the shifted brain series gives, except near the turn."
    torch.manual_seed(0)
    model = BrainAutoencoder(ModelConfig.preset("tiny", context_trs=8, temporal_kernel=3)).eval()
    series = torch.randn(60, model.config.n_voxels)
    s = 25
    a, b = roll_decoded(model.decode_series(series), s), model.decode_series(torch.roll(series, s, 0))
    far = np.r_[8:s - 8, s + 8:52]
    for m in a: np.testing.assert_allclose(a[m][far], b[m][far], atol=1e-5)
    assert not np.allclose(a["audio"][s - 1:s + 1], b["audio"][s - 1:s + 1], atol=1e-5)


def test_decode_block_rejects_gaps_and_runs():
    "The null rolls the brain series, so a block with a gap or across two runs is refused."
    class T: run = np.repeat([0, 1], 50)
    model = BrainAutoencoder(ModelConfig.preset("tiny", context_trs=8))
    with pytest.raises(ValueError, match="contiguous"): decode_block(model, T(), np.r_[10:20, 30:40])
    with pytest.raises(ValueError, match="one run"): decode_block(model, T(), np.r_[40:60])
