"""Feature streams from tiny random-initialised backbones saved to disk and loaded back by path: shapes on the TR grid,
causality, the cache (reuse, rebuild after corruption, resume, sharding over ranks), the offline message, and a model that
trains with a stream."""
import logging

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("transformers", reason="transformers (the [features] extra) is not installed")
import giblet.features as gf
from giblet.windows import read_transcript, words_from_annotations
from giblet.data.audio import demo_waveform
from giblet.data.video import frames_to_video
from giblet.features import StreamRun, extract_stream, load_stream, load_streams, tiny_backbone
from giblet.study import StreamSpec, parse_stream_spec

TR, FPS = 1.0, 8
WORDS = "sherlock watson walks into the room and says hello to a man who waits".split()


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    "Never reach for the hub (the models here are on disk): offline mode, also where huggingface_hub read the env before."
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: tiny_backbone(root / k, k, words=WORDS) for k in ("image", "video", "audio", "whisper", "text")}


def film_frames(n_frames, seed=0, h=24, w=40):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n_frames, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    "Two lossless films that are identical for the first 5 s and differ after."
    root = tmp_path_factory.mktemp("films")
    a, b = film_frames(10 * FPS, 0), film_frames(10 * FPS, 1)
    b[:5 * FPS] = a[:5 * FPS]
    return frames_to_video(a, root / "a.mp4", FPS, crf=0), frames_to_video(b, root / "b.mp4", FPS, crf=0)


def run(spec, source, times, tmp_path, **kw):
    return np.asarray(load_stream(extract_stream(spec, source, times, TR, tmp_path / "cache", progress=False, **kw)), np.float32)


def test_parse_stream_spec():
    s = parse_stream_spec("video=/models/dino:-1,4:pooling=cls:context_trs=2:name=dino")
    assert s == StreamSpec("video", "/models/dino", (-1, 4), "cls", context_trs=2, name="dino")
    assert parse_stream_spec("text=meta-llama/Llama-3.2-3B").layers == (-1,) and parse_stream_spec("text=x").pooling == "last"
    for bad in ("video", "smell=x", "video=x:1:color=red", "audio=x:pooling=cls", "video=x:name=a.b"):
        with pytest.raises(ValueError): parse_stream_spec(bad)


@pytest.mark.parametrize("kind,context", [("image", 1), ("video", 0)])
def test_video_stream_shapes_and_causality(models, films, tmp_path, kind, context):
    times = 0.5 + np.arange(8) * TR   # the run starts the film at 0.5 s: windows [0.5, 1.5), ...
    spec = StreamSpec("video", str(models[kind]), (-1, 1), context_trs=context)
    a, b = (run(spec, f, times, tmp_path) for f in films)
    assert a.shape == (8, 32) and a.dtype == np.float32 and np.abs(a).sum(1).min() > 0
    ends = times + TR
    np.testing.assert_array_equal(a[ends <= 5], b[ends <= 5])   # frames after a window's end never reach it
    assert not np.allclose(a[ends > 5.2], b[ends > 5.2], atol=1e-3)


@pytest.mark.parametrize("kind", ["audio", "whisper"])
def test_audio_stream_shapes_causality_and_film(models, films, tmp_path, caplog, kind):
    sr = 16000
    wave = demo_waveform(10.0, sr)
    later = wave.copy(); later[int(5.0 * sr):] = demo_waveform(5.0, sr, seed=3)
    times = np.arange(9) * TR
    spec = StreamSpec("audio", str(models[kind]), (-1,), context_trs=1)
    with caplog.at_level(logging.INFO, "giblet"):
        a = run(spec, (wave, sr), times, tmp_path)
    assert "1 clips reach before the film's start; silence there" in caplog.text
    b = run(spec, (later, sr), times, tmp_path)
    assert a.shape == (9, 16)
    np.testing.assert_array_equal(a[times + TR <= 5], b[times + TR <= 5])
    assert not np.allclose(a[times + TR > 5], b[times + TR > 5], atol=1e-3)
    with pytest.raises(ValueError, match="ends before TR window"): run(spec, (wave[:sr * 3], sr), times, tmp_path)
    silent = tmp_path / "with_sound.mp4"
    frames_to_video(film_frames(4 * FPS), silent, FPS, audio=wave[:4 * sr] * 0.5, sample_rate=sr)
    assert run(spec, silent, np.arange(3) * TR, tmp_path).shape == (3, 16)


def test_text_stream_causality_zeros_and_annotations(models, tmp_path):
    words = pd.DataFrame({"onset": np.arange(len(WORDS)) * 0.5 + 1.2, "duration": 0.4, "word": WORDS})
    path = tmp_path / "words.tsv"; words.to_csv(path, sep="\t", index=False)
    times = np.arange(9) * TR
    spec = StreamSpec("text", str(models["text"]), (-1, 1))
    a = run(spec, path, times, tmp_path)
    assert a.shape == (9, 32)
    assert (a[0] == 0).all() and (np.abs(a[1:]).sum(1) > 0).all()   # TR 0 ends before the first word
    changed = words.copy(); changed.loc[changed.onset >= 4.0, "word"] = "man"
    b = run(spec, changed, times, tmp_path)
    np.testing.assert_array_equal(a[times + TR <= 4.0], b[times + TR <= 4.0])
    assert not np.allclose(a[times + TR > 4.0], b[times + TR > 4.0])
    ann = pd.DataFrame({"start": [0.0, 3.0], "end": [3.0, 9.0], "text": ["Sherlock walks", "Watson says hello"]})
    c = run(spec, words_from_annotations(ann), times, tmp_path)
    assert (c[:3] == c[0]).all() and not np.allclose(c[2], c[3])   # the second segment's words arrive at 3 s
    with pytest.raises(ValueError, match="missing \\['duration'\\]"): read_transcript(_write(tmp_path / "bad.tsv", "onset\tword\n1\ta\n"))


def _write(path, text):
    path.write_text(text); return path


def test_cache_reuse_and_rebuild_after_corruption(models, films, tmp_path, monkeypatch, caplog):
    times = np.arange(6) * TR
    spec = StreamSpec("video", str(models["image"]))
    first = extract_stream(spec, films[0], times, TR, tmp_path, progress=False, chunk_trs=4)
    ref = np.array(load_stream(first))   # a copy: the file is damaged below
    assert sorted(p.name for p in first.iterdir()) == ["features.npy", "manifest.json"]
    loads = []
    real = gf.load_backbone
    monkeypatch.setattr(gf, "load_backbone", lambda *a, **k: loads.append(1) or real(*a, **k))
    assert extract_stream(spec, films[0], times, TR, tmp_path, progress=False, chunk_trs=4) == first and not loads
    other = extract_stream(spec, films[0], times + 1.0, TR, tmp_path, progress=False, chunk_trs=4)   # another grid
    assert other != first and len(loads) == 1
    data = bytearray((first / "features.npy").read_bytes()); data[-3] ^= 0xFF
    (first / "features.npy").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, "giblet.features"):
        again = extract_stream(spec, films[0], times, TR, tmp_path, progress=False, chunk_trs=4)
    assert "do not match their manifest" in caplog.text and len(loads) == 2
    np.testing.assert_array_equal(np.asarray(load_stream(again)), ref)


class Killed(BaseException):
    "A job killed mid-extraction."


def test_resume_after_interruption_and_sharding(models, tmp_path, monkeypatch):
    sr, times = 16000, np.arange(10) * TR
    wave = demo_waveform(11.0, sr)
    spec = StreamSpec("audio", str(models["audio"]))
    kw = dict(progress=False, chunk_trs=2)
    ref = load_stream(extract_stream(spec, (wave, sr), times, TR, tmp_path / "ref", **kw))
    calls, real, resumed = [], gf._compute_chunk, []

    def flaky(bb, inputs, idx, batch_size):
        calls.append(int(idx[0]))
        if len(calls) == 3 and not resumed: raise Killed   # the job is killed during its third chunk
        return real(bb, inputs, idx, batch_size)
    monkeypatch.setattr(gf, "_compute_chunk", flaky)
    with pytest.raises(Killed): extract_stream(spec, (wave, sr), times, TR, tmp_path, **kw)
    calls.clear(); resumed.append(True)
    done = extract_stream(spec, (wave, sr), times, TR, tmp_path, **kw)
    assert calls == [4, 6, 8]   # only the chunks not yet written
    np.testing.assert_array_equal(load_stream(done), ref)
    # two ranks share the chunks; the finished cache is the same
    calls.clear()
    shard = tmp_path / "ranks"
    assert extract_stream(spec, (wave, sr), times, TR, shard, rank=1, world_size=2, wait=False, **kw) is None
    assert calls == [2, 6]
    monkeypatch.setenv("RANK", "0"); monkeypatch.setenv("WORLD_SIZE", "2")
    folder = extract_stream(spec, (wave, sr), times, TR, shard, wait=False, **kw)
    assert calls == [2, 6, 0, 4, 8]
    np.testing.assert_array_equal(load_stream(folder), ref)


def test_offline_name_gives_one_clear_line(films, tmp_path):
    with pytest.raises(FileNotFoundError, match="none.mp4: no such film"):
        extract_stream("video=x:-1", tmp_path / "none.mp4", [0.0], TR, tmp_path, progress=False)
    with pytest.raises(OSError) as e:
        extract_stream("video=giblet-test/no-such-model:-1", films[0], [0.0], TR, tmp_path, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "giblet-test/no-such-model" in msg and "pass DIR instead of the name" in msg


def test_load_streams_concatenates_runs(models, films, tmp_path):
    words = pd.DataFrame({"onset": np.arange(len(WORDS)) * 0.6, "duration": 0.5, "word": WORDS})
    runs = [StreamRun(films[0], np.arange(3) * TR, words), StreamRun(films[1], 4.0 + np.arange(4) * TR, words)]
    specs = [f"video={models['image']}:-1", f"text={models['text']}:1:name=lm"]
    out = load_streams(specs, runs, TR, tmp_path, progress=False)
    assert {k: v.shape for k, v in out.items()} == {"video": (7, 16), "lm": (7, 16)}
    alone = load_streams(specs[:1], runs[1:], TR, tmp_path, progress=False)["video"]
    np.testing.assert_array_equal(out["video"][3:], alone)


def test_model_trains_on_extracted_streams(models, films, tmp_path):
    from giblet.models.autoencoder import BrainAutoencoder, compute_losses
    from giblet.models.encoder import ModelConfig, example_batch
    words = pd.DataFrame({"onset": np.arange(len(WORDS)) * 0.6, "duration": 0.5, "word": WORDS})
    times = np.arange(8) * TR
    streams = load_streams([f"video={models['video']}:-1", f"text={models['text']}:-1:name=lm"],
                           [StreamRun(films[0], times, words)], TR, tmp_path, progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", context_trs=8, stream_dims={k: v.shape[1] for k, v in streams.items()})
    model = BrainAutoencoder(cfg)
    batch = example_batch(cfg, 1)
    batch.update({gf.stream_key(k): torch.from_numpy(v)[None] for k, v in streams.items()})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    keys = [gf.stream_key(k) for k in streams]
    losses = []
    for _ in range(15):
        loss = compute_losses(model(batch, modalities=keys, heads=[]), batch, {})["fmri"]
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        assert all(p.grad.abs().max() > 0 for k in keys for p in model.encoder.fusion.proj[k].parameters())
    assert losses[-1] < 0.7 * losses[0], losses


def test_one_job_joins_the_chunks_while_another_waits(models, tmp_path):
    from giblet.io import RunLock
    sr, times = 16000, np.arange(4) * TR
    wave = demo_waveform(5.0, sr)
    spec = StreamSpec("audio", str(models["audio"]))
    kw = dict(progress=False, chunk_trs=2)
    assert extract_stream(spec, (wave, sr), times, TR, tmp_path, rank=1, world_size=2, wait=False, **kw) is None
    folder = next(tmp_path.iterdir())
    with RunLock(folder, ".finalize.lock"):   # another job is joining the chunks: this one waits for it, then gives up
        with pytest.raises(TimeoutError, match="did not finish"):
            extract_stream(spec, (wave, sr), times, TR, tmp_path, timeout=0.5, **kw)
        assert not (folder / "features.npy").exists()
    assert extract_stream(spec, (wave, sr), times, TR, tmp_path, **kw) == folder
    assert load_stream(folder).shape == (4, 16)


def test_retrained_local_weights_make_a_new_cache(films, tmp_path, monkeypatch):
    "The key fingerprints a local model's files: new weights in the same folder extract again, unchanged ones reuse the cache."
    folder = tiny_backbone(tmp_path / "dino", "image", seed=0)
    times = np.arange(4) * TR
    spec = StreamSpec("video", str(folder))
    first = extract_stream(spec, films[0], times, TR, tmp_path / "cache", progress=False)
    before = np.array(load_stream(first))
    tiny_backbone(folder, "image", seed=1)                  # retrained in place: same files, same sizes, other weights
    second = extract_stream(spec, films[0], times, TR, tmp_path / "cache", progress=False)
    assert second != first and not np.allclose(load_stream(second), before)
    monkeypatch.setattr(gf, "load_backbone", lambda *a, **k: pytest.fail("an unchanged model was loaded again"))
    assert extract_stream(spec, films[0], times, TR, tmp_path / "cache", progress=False) == second
    with pytest.raises(ValueError, match="names a hub revision, but this is a local folder"):
        extract_stream(StreamSpec("video", str(folder), revision="v1"), films[0], times, TR, tmp_path / "cache", progress=False)


def fake_hub(root, name, commit, folder):
    "Put a saved model into a Hugging Face cache layout under `root` as snapshot `commit`, the one 'main' points at."
    import shutil
    repo = root / ("models--" + name.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True); (repo / "refs" / "main").write_text(commit)


def test_a_hub_name_is_keyed_by_its_commit(films, tmp_path, monkeypatch):
    "A hub name's cache key holds the commit the local cache resolves ('main', or revision=): a new snapshot extracts again."
    import huggingface_hub.constants as hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    a, b = "a" * 40, "b" * 40
    fake_hub(tmp_path / "hub", "giblet/tiny-dino", a, tiny_backbone(tmp_path / "m0", "image", seed=0))
    times, cache = np.arange(4) * TR, tmp_path / "cache"
    spec = StreamSpec("video", "giblet/tiny-dino")
    assert gf.cache_key(spec, films[0], times, TR)["model"] == {"model": "giblet/tiny-dino", "revision": a}
    old = extract_stream(spec, films[0], times, TR, cache, progress=False)
    fake_hub(tmp_path / "hub", "giblet/tiny-dino", b, tiny_backbone(tmp_path / "m1", "image", seed=1))   # main moves on
    new = extract_stream(spec, films[0], times, TR, cache, progress=False)
    assert new != old and not np.allclose(load_stream(new), load_stream(old))
    pinned = StreamSpec("video", "giblet/tiny-dino", revision=a)   # the old commit, by revision=: its cache again
    monkeypatch.setattr(gf, "load_backbone", lambda *a, **k: pytest.fail("a cached commit was loaded again"))
    assert extract_stream(pinned, films[0], times, TR, cache, progress=False) == old


def test_a_missing_processor_package_is_named_in_one_line(tmp_path):
    "V-JEPA 2's video processor needs torchvision: without it, one line names the package (with it, the model loads)."
    import importlib.util
    import json
    import transformers as tf
    cfg = tf.VJEPA2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, crop_size=32, patch_size=8,
                          frames_per_clip=4, tubelet_size=2, pred_hidden_size=16, pred_num_hidden_layers=1, pred_num_attention_heads=2)
    tf.AutoModel.from_config(cfg).save_pretrained(tmp_path / "vjepa2")
    (tmp_path / "vjepa2" / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "VJEPA2VideoProcessor", "crop_size": {"height": 32, "width": 32}, "size": {"shortest_edge": 32}}))
    spec = StreamSpec("video", str(tmp_path / "vjepa2"))
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(ImportError) as e: gf.load_backbone(spec)
        assert str(e.value) == f"{spec.model}: its video processor needs torchvision, which is not installed: pip install torchvision"
    else:
        bb = gf.load_backbone(spec)
        assert bb.video_model and bb.n_frames == 4
