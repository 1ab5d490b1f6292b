"""The giblet model end to end: shapes in every mode, gradients, batch-size independence, determinism, checkpoints,
overfitting one batch, lesions and the parameter budget."""
import numpy as np
import pytest
import torch

from giblet.models.autoencoder import BrainAutoencoder, compute_losses, param_breakdown, target_variances
from giblet.models.decoder import apply_lesion
from giblet.models.encoder import PRESETS, ModelConfig, example_batch


@pytest.fixture(autouse=True)
def one_thread():
    "The models here are tiny: one thread is fastest and leaves the other cores to parallel workers."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return BrainAutoencoder(ModelConfig.preset("tiny", **overrides))


def variances_of(batch):
    return target_variances(batch["video"].flatten(0, 1).numpy(), batch["audio"].flatten(0, 1).numpy(),
                            batch["text"].flatten(0, 1).numpy(), batch["has_text"].flatten().numpy())


def shapes(cfg, B):
    K = cfg.context_trs
    return dict(video=(B, K, cfg.frames_per_tr, cfg.frame_height, cfg.frame_width, 3),
                audio=(B, K, cfg.n_mels, cfg.mel_frames), text=(B, K, cfg.text_dim))


@pytest.mark.parametrize("temporal", ["conv", "transformer"])
@pytest.mark.parametrize("n_subjects", [0, 3])
def test_shapes_in_every_mode(temporal, n_subjects):
    model = make(temporal=temporal, n_subjects=n_subjects).eval()
    cfg, B = model.config, 4
    batch = example_batch(cfg, B, subjects=n_subjects > 0)
    rec, V = shapes(cfg, B), (B, cfg.context_trs, cfg.n_voxels)
    lesion = torch.zeros(cfg.n_voxels, dtype=torch.bool); lesion[::3] = True
    with torch.no_grad():
        for kw in [{}, dict(lesion=lesion), dict(keep=lesion), dict(lesion=lesion[None].repeat(B, 1)),
                   dict(modalities=["video"]), dict(modalities=["audio", "text"]), dict(modalities=[])]:
            out = model(batch, **kw)
            assert {k: tuple(v.shape) for k, v in out.items()} == dict(brain=V, **rec), kw
            assert out["video"].dtype == torch.float32 and 0 <= out["video"].min() and out["video"].max() <= 1
        both = model(batch, decode_from="both")
        assert {k: tuple(v.shape) for k, v in both.items()} == dict(brain=V, **rec, **{f"{k}_fmri": s for k, s in rec.items()})
        meas = model(batch, decode_from="fmri")
        assert torch.equal(meas["audio"], both["audio_fmri"])
        assert torch.equal(model.decode(batch["fmri"])["text"], meas["text"])
        # a batch that lacks a modality runs without it; one without subject ids uses the average head
        partial = {k: v for k, v in batch.items() if k not in ("video", "subject")}
        assert tuple(model(partial)["brain"].shape) == V
        assert tuple(model.encode({"trs": batch["trs"]}).shape) == V
        assert list(model.decode(model.encode(batch), heads=["audio"])) == ["audio"]


def test_missing_modalities_use_absent_vectors():
    model = make().eval()
    batch = example_batch(model.config, 2)
    with torch.no_grad():
        a = model.encode(batch, modalities=["audio", "text"])
        b = model.encode({k: v for k, v in batch.items() if k != "video"})
        noisy = dict(batch, video=torch.randint_like(batch["video"], 0, 255))
        c = model.encode(noisy, modalities=["audio", "text"])
    assert torch.equal(a, b) and torch.equal(a, c)  # video is ignored entirely
    with pytest.raises(ValueError, match="no such key"): model.encode({"audio": batch["audio"]}, modalities=["video"])
    with pytest.raises(ValueError, match="unknown modalities"): model.encode(batch, modalities=["smell"])


@pytest.mark.parametrize("temporal", ["conv", "transformer"])
def test_gradients_reach_every_parameter(temporal):
    model = make(temporal=temporal, n_subjects=2, dropout=0.1).train()
    batch = example_batch(model.config, 6, subjects=True)  # subjects -1, 0, 1 and TRs with and without text
    var = variances_of(batch)
    loss = compute_losses(model(batch, decode_from="both"), batch, var, w_corr=1.0)["total"]
    loss = loss + compute_losses(model(batch, modalities=[]), batch, var)["total"]  # the 'absent' vectors
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().max() == 0]
    assert not dead, dead


@pytest.mark.parametrize("temporal", ["conv", "transformer"])
def test_batch_size_one_equals_batch_of_eight(temporal):
    model = make(temporal=temporal, n_subjects=3).eval()
    batch = example_batch(model.config, 8, subjects=True)
    with torch.no_grad():
        full = model(batch, decode_from="both")
        for i in (0, 5):
            one = model({k: v[i:i + 1] for k, v in batch.items()}, decode_from="both")
            for k in full: torch.testing.assert_close(one[k][0], full[k][i], rtol=1e-5, atol=1e-5)


def test_deterministic_for_a_seed():
    batch = example_batch(ModelConfig.preset("tiny"), 3)
    a, b = make(seed=7, modality_dropout=0.3, dropout=0.1), make(seed=7, modality_dropout=0.3, dropout=0.1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    outs = []
    for m in (a, b):
        torch.manual_seed(1)  # training mode: dropout and modality dropout draw from the seeded generator
        outs.append(m.train()(batch))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    with torch.no_grad():
        e1, e2 = a.eval()(batch), a(batch)
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    assert not torch.equal(make(seed=8).state_dict()["decoder.inp.0.weight"], a.state_dict()["decoder.inp.0.weight"])


@pytest.mark.parametrize("temporal", ["conv", "transformer"])
def test_save_load_round_trip_is_exact(tmp_path, temporal):
    model = make(temporal=temporal, n_subjects=2)
    batch = example_batch(model.config, 2, subjects=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # move the weights off their initial values
    compute_losses(model(batch), batch, variances_of(batch))["total"].backward(); opt.step()
    path = model.save(tmp_path / "sub" / "model.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # nothing temporary left behind
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"config", "state_dict"} and ckpt["config"] == model.config.to_dict()
    loaded = BrainAutoencoder.load(path)
    assert loaded.config == model.config
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    model.eval(); loaded.eval()
    with torch.no_grad():
        o1, o2 = model(batch, decode_from="both"), loaded(batch, decode_from="both")
    assert all(torch.equal(o1[k], o2[k]) for k in o1)
    with pytest.raises(FileNotFoundError, match="missing.pt"): BrainAutoencoder.load(tmp_path / "missing.pt")
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"): BrainAutoencoder.load(tmp_path / "bad.pt")


def test_tiny_model_overfits_one_batch():
    model = make(seed=0)
    batch = example_batch(model.config, 2, seed=3)
    var = variances_of(batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    hist = []
    for _ in range(200):
        terms = compute_losses(model(batch), batch, var)
        opt.zero_grad(); terms["total"].backward(); opt.step()
        hist.append({k: v.item() for k, v in terms.items()})
    assert hist[-1]["total"] < hist[0]["total"] / 10, (hist[0], hist[-1])
    for k in ("fmri", "video", "audio", "text"):  # every term learns, not just the largest
        assert hist[-1][k] < hist[0][k] / 3, (k, hist[0][k], hist[-1][k])


def test_lesion_of_all_units_makes_output_independent_of_input():
    model = make().eval()
    all_units = torch.ones(model.config.n_voxels, dtype=torch.bool)
    with torch.no_grad():
        a = model.decode(torch.randn(2, 8, model.config.n_voxels), lesion=all_units)
        b = model.decode(5 * torch.randn(2, 8, model.config.n_voxels), lesion=all_units)
        c = model.decode(torch.randn(2, 8, model.config.n_voxels), keep=~all_units)
        d = model.decode(torch.randn(2, 8, model.config.n_voxels))
        e = model.decode(torch.randn(2, 8, model.config.n_voxels))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(d["video"], e["video"])  # without the lesion the input matters
    assert all(torch.equal(a[k][0], a[k][1]) for k in a)  # every sample gets the same rendering


def test_lesion_changes_only_what_the_lesioned_units_carry():
    model = make().eval()
    brain = torch.randn(2, 8, model.config.n_voxels)
    mask = torch.zeros(model.config.n_voxels, dtype=torch.bool); mask[:100] = True
    other = brain.clone(); other[..., :100] = torch.randn(2, 8, 100)  # differs only on lesioned units
    with torch.no_grad():
        a, b = model.decode(brain, lesion=mask), model.decode(other, lesion=mask)
        k1, k2 = model.decode(brain, keep=~mask), model.decode(other, keep=~mask)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], k1[k]) and torch.equal(k1[k], k2[k]) for k in a)
    with pytest.raises(ValueError, match="bool"): apply_lesion(brain, mask.int())
    with pytest.raises(ValueError, match="not both"): model.decode(brain, lesion=mask, keep=mask)


def test_losses_mask_and_normalise():
    cfg = ModelConfig.preset("tiny")
    batch = example_batch(cfg, 8, seed=2)
    var = variances_of(batch)
    perfect = dict(brain=batch["fmri"].clone(), video=batch["video"].float() / 255, audio=batch["audio"].clone(),
                   text=batch["text"].clone())
    terms = compute_losses(perfect, batch, var, w_corr=1.0)
    for k in ("fmri", "video", "audio", "text", "total"): assert terms[k].item() < 1e-6, k
    assert abs(terms["corr"].item()) < 1e-5
    # errors where fMRI is absent (mask), in skipped TRs, or where there is no text do not count
    wrong = dict(perfect, brain=perfect["brain"].clone(), text=torch.where(batch["has_text"][..., None], perfect["text"], 9.0))
    wrong["brain"][:, :2] += 10
    mask = torch.ones(8, cfg.context_trs, dtype=torch.bool); mask[:, 2] = False
    wrong["brain"][:, 2] -= 10
    t = compute_losses(wrong, dict(batch, fmri_mask=mask), var, skip_first=2)
    assert t["fmri"].item() < 1e-6 and t["text"].item() < 1e-6
    bad_end = dict(perfect, audio=perfect["audio"].clone()); bad_end["audio"][:, -3:] += 5
    assert compute_losses(bad_end, batch, var, skip_last=3)["audio"].item() < 1e-6
    assert compute_losses(bad_end, batch, var)["audio"].item() > 1
    # weights combine the terms; the scale of a target does not change its normalised loss
    half = dict(perfect, audio=perfect["audio"] + 0.5 * np.sqrt(var["audio"]))
    t = compute_losses(half, batch, var, w_audio=2.0, w_fmri=0.5)
    assert abs(t["audio"].item() - 0.25) < 1e-4 and abs(t["total"].item() - 0.5) < 1e-3
    scaled = dict(batch, audio=batch["audio"] * 10)
    t10 = compute_losses(dict(half, audio=half["audio"] * 10), scaled, dict(var, audio=var["audio"] * 100))
    assert abs(t10["audio"].item() - 0.25) < 1e-4


def test_target_variances_match_numpy():
    g = np.random.default_rng(0)
    video = g.integers(0, 256, (70, 3, 4, 5, 3), dtype=np.uint8)
    audio = g.normal(2, 3, (70, 6, 5)).astype(np.float32)
    text = g.normal(size=(70, 8)).astype(np.float32); has = g.random(70) > 0.4
    v = target_variances(video, audio, text, has)
    assert np.isclose(v["video"], (video.reshape(-1, 60) / 255.0).var(0).mean())
    assert np.isclose(v["audio"], audio.transpose(1, 0, 2).reshape(6, -1).var(1).mean())
    assert np.isclose(v["text"], text[has].var(0).mean())
    with pytest.raises(ValueError, match="constant"): target_variances(video=np.zeros((5, 1, 2, 2, 3), np.uint8))


def test_config_presets_and_param_budget():
    for name in PRESETS:
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        with torch.device("meta"):
            counts = param_breakdown(BrainAutoencoder(cfg))
        assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
        assert {"encoder.video", "encoder.head", "decoder.inp", "decoder.video"} <= set(counts)
    sher = ModelConfig.preset("sherlock")
    assert (sher.frame_width, sher.frame_height, sher.frames_per_tr, sher.n_mels) == (160, 90, 19, 128)
    assert sher.context_trs * sher.tr >= 24
    assert counts["total"] < 100_000_000, counts
    assert ModelConfig.preset("tiny", n_voxels=7).n_voxels == 7


def test_no_batchnorm_and_layering():
    model = make()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    import giblet.models.autoencoder as ae, giblet.models.decoder as de, giblet.models.encoder as en
    for mod in (ae, de, en):
        src = open(mod.__file__).read()
        assert "giblet.training" not in src and "giblet.dataset" not in src, mod.__name__


def test_feature_stream_trains_drops_out_and_round_trips(tmp_path):
    model = make(seed=0, stream_dims={"lm": 24}, modality_dropout=0.5)
    key = "stream_lm"
    batch, held_out = example_batch(model.config, 16, seed=1), example_batch(model.config, 8, seed=2)
    var = variances_of(batch)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fmri = lambda b: compute_losses(model(b, modalities=[key]), b, var)["fmri"]
    with torch.no_grad(): before = fmri(held_out).item()
    for step in range(40):
        loss = compute_losses(model(batch, modalities=[key]), batch, var)["total"]
        opt.zero_grad(); loss.backward()
        if step == 0:   # the gradient reaches the stream's projector
            assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.encoder.fusion.proj[key].parameters())
        opt.step()
    model.eval()
    with torch.no_grad():
        after = fmri(held_out).item()
        shuffled = fmri(dict(held_out, **{key: held_out[key][torch.randperm(8)]})).item()
    assert after < 0.85 * before and after < 0.9 * shuffled, (before, after, shuffled)   # the stream carries what it was mixed from
    # modality dropout covers the stream: a dropped sample gets the stream's absent vector
    model.train(); torch.manual_seed(0)
    with torch.no_grad():
        trained = model.encode(batch, modalities=[key])
        absent = model.eval().encode({k: v for k, v in batch.items() if k != key}, modalities=[])
    same = [torch.equal(trained[i], absent[i]) for i in range(16)]
    assert 0 < sum(same) < 16, same
    path = model.save(tmp_path / "stream.pt")
    loaded = BrainAutoencoder.load(path).eval()
    assert loaded.config.stream_dims == {"lm": 24}
    with torch.no_grad(): assert torch.equal(loaded(batch)["brain"], model.eval()(batch)["brain"])
    with pytest.raises(ValueError, match="no input for"): make().encode(batch)


def test_linear_path_reads_the_ridge_features_and_round_trips(tmp_path):
    "The linear path: the baseline's cheap features, standardised with the statistics it was given, saved with the weights."
    from giblet.metrics import stimulus_features
    model = make(linear_delay=6.0, linear_grid=(4, 2))
    lin = model.encoder.linear
    batch = example_batch(model.config, 3, seed=1)
    want = stimulus_features(batch["video"].flatten(0, 1).numpy(), batch["audio"].flatten(0, 1).numpy(),
                             batch["text"].flatten(0, 1).numpy(), grid=(4, 2))
    np.testing.assert_allclose(lin.raw(batch).flatten(0, 1).numpy(), want, atol=1e-4)
    lin.fit_scale([batch])
    np.testing.assert_allclose(lin.mean.numpy(), want.mean(0), atol=1e-4)
    with torch.no_grad(): torch.nn.init.normal_(lin.fir.mix.weight)   # off its zero start
    path = model.save(tmp_path / "model.pt")
    loaded = BrainAutoencoder.load(path).eval()
    assert torch.equal(loaded.encoder.linear.std, lin.std)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode(batch), loaded.encode(batch))
        off = model.encode(batch) - model.encode(batch, modalities=["video", "text"])
    assert off.abs().max() > 0   # audio reaches the brain layer through the linear path too
    assert make().encoder.linear is None   # off unless asked for: older configs build the same model


def test_linear_path_learns_a_linear_response():
    "A brain layer that is a delayed linear function of the mel means is learnt by the linear path alone."
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", linear_delay=4.5, linear_modalities=("audio",), n_voxels=4)
    model = BrainAutoencoder(cfg)
    batches = [example_batch(cfg, 8, seed=s, fmri=False) for s in range(4)]
    lin = model.encoder.linear
    lin.fit_scale(batches)
    w = torch.randn(cfg.n_mels, 4)
    def target(b):   # the mean over mel time, one TR late
        x = (b["audio"].mean(-1) - lin.mean[:cfg.n_mels]) / lin.std[:cfg.n_mels]
        return torch.nn.functional.pad(x @ w, (0, 0, 1, 0))[:, :-1]
    opt = torch.optim.Adam(lin.parameters(), lr=0.03)
    for step in range(300):
        b = batches[step % 3]
        loss = ((lin(b) - target(b)) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): p, t = lin(batches[3]), target(batches[3])
    r = np.corrcoef(p[:, 1:].flatten().numpy(), t[:, 1:].flatten().numpy())[0, 1]
    assert r > 0.9, r
