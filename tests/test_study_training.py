"""Real-study paths end to end: a two-run synthetic study trains through a study spec file and through BIDS from the command line."""
import json
from pathlib import Path

import numpy as np
import torch
import pytest
import yaml

from giblet import cli
from giblet.synthetic import make_dataset
from conftest import QUICK_32

KW = dict(n_subjects=2, n_trs=160, n_runs=2, seed=3, shape=(10, 12, 10), size=(32, 18))
FAST = QUICK_32   # giblet-train's --config for these 32 x 18 studies


@pytest.fixture(scope="module")
def cache(tmp_path_factory): return tmp_path_factory.mktemp("cache")


def train(out, cache, *extra, epochs=1, config=FAST):
    "giblet-train in this process, on arguments parsed as its console script parses them."
    argv = ["--out", str(out), "--cache-dir", str(cache), "--epochs", str(epochs), "--device", "cpu", "--no-baseline",
            "--config", json.dumps(config), *extra]
    return cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))


def spec_file(lay, path):
    "A hand-written YAML spec of a synthetic study, its paths relative to the spec's folder."
    rel = lambda p: str(Path(p).relative_to(lay.root))
    runs = [dict(name=f"run-{i + 1}", film_start=r["film_start"], film_stop=r["film_stop"], scan_offset=r["scan_offset"],
                 part=r["part"], nii={f"s{k + 1}": rel(p) for k, p in enumerate(r["nii"])}) for i, r in enumerate(lay.runs)]
    path.write_text(yaml.safe_dump({"tr": 1.5, "film": rel(lay.film), "annotations": rel(lay.annotations), "runs": runs}))
    return path


@pytest.fixture(scope="module")
def sherlock(tmp_path_factory): return make_dataset(tmp_path_factory.mktemp("study") / "sherlock", **KW)


def test_two_runs_train_through_a_spec_file(sherlock, cache, tmp_path, monkeypatch, capsys):
    spec = spec_file(sherlock, sherlock.root / "study.yaml")
    monkeypatch.chdir(sherlock.root)                         # relative paths on the command line are stored absolute
    cli.giblet_train(["--study", "study.yaml", "--show-study"])
    shown = capsys.readouterr().out
    assert "2 subjects x 2 runs" in shown and "run-2" in shown and not (Path("runs") / "demo").exists()
    m = train(tmp_path / "run", cache, "--study", "study.yaml")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["data"]
    assert saved["study"] == str(spec) and saved["data_dir"] is None and saved["cache_dir"] == str(cache)
    assert m["epochs"] == 1 and np.isfinite(m["test_voxel_r_selected"])
    n_trs = len(m["test_trs"]) + len(m["val_trs"]) + m["n_train_trs"]
    assert 140 <= n_trs + 2 * 22 <= 160                      # both runs (two runs of ~80 TRs), less the two 32 s gaps
    # --film-start moves every run's segment: another study, so resuming with it is refused by name
    with pytest.raises(ValueError, match="film_start"): train(tmp_path / "run", cache, "--study", "study.yaml", "--resume", "--film-start", "2")


def test_two_runs_train_through_bids(cache, tmp_path_factory, tmp_path):
    bids = make_dataset(tmp_path_factory.mktemp("study") / "bids", layout="bids", **KW)
    m = train(tmp_path / "run", cache, "--data-dir", str(bids.root))
    assert m["epochs"] == 1 and np.isfinite(m["test_voxel_r_selected"])
    n_trs = len(m["test_trs"]) + len(m["val_trs"]) + m["n_train_trs"]
    assert 140 <= n_trs + 2 * 22 <= 160


def test_one_stream_of_each_kind_trains_from_the_command_line(sherlock, cache, tmp_path):
    from giblet.data.text import load_annotations
    from giblet.features import tiny_backbone
    words = sorted({w for t in load_annotations(sherlock.annotations)["text"].dropna() for w in str(t).split()})
    models = {k: tiny_backbone(tmp_path / k, k, words=words) for k in ("image", "audio", "text")}
    spec = spec_file(sherlock, sherlock.root / "study.yaml")
    out = tmp_path / "run"
    feats = [f"video={models['image']}:-1:n_frames=2", f"audio={models['audio']}:1", f"text={models['text']}:-1"]
    cache = tmp_path / "cache"   # giblet-cache builds every cache the run reads, ahead of it
    common = ["--cache-dir", str(cache), "--study", str(spec), "--config", json.dumps(FAST), "--features", *feats]
    built = cli.cache_main(**cli.cli_args(cli.cache_main, "giblet-cache", common))
    assert built["runs"] == 2 and built["streams"] == {k: [built["n_trs"], 16] for k in ("video", "audio", "text")}
    before = sorted(p.relative_to(cache) for p in cache.rglob("*") if "manifest" in p.name)
    argv = ["--out", str(out), "--epochs", "1", "--device", "cpu", *common]
    m = cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))
    assert sorted(p.relative_to(cache) for p in cache.rglob("*") if "manifest" in p.name) == before and before
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["data"]["features"] == feats and saved["model"]["stream_dims"] == {"video": 16, "audio": 16, "text": 16}
    assert np.isfinite(m["test_voxel_r_selected"])
    # the baseline gains one band per stream
    assert {"video", "audio", "text", "stream_video", "stream_audio", "stream_text"} <= set(m["baseline"]["bands"])
    # the model reads the streams: its checkpoint holds a projector per stream
    sd = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]["state_dict"]
    assert all(any(f".{n}." in k for k in sd) for n in ("stream_video", "stream_audio", "stream_text"))
    checked = cli.cache_main(**cli.cli_args(cli.cache_main, "giblet-cache", ["--cache-dir", str(cache), "--only-verify"]))
    assert checked["verified"] >= 1 and checked["removed"] == []


def stream_spec(lay, path, features):
    "The synthetic study's YAML spec with `features` added."
    spec = yaml.safe_load(spec_file(lay, path).read_text())
    path.write_text(yaml.safe_dump(spec | {"features": features}))
    return path


@pytest.fixture(scope="module")
def dino(sherlock):
    "A tiny image backbone in the study's folder, so a spec can name it by a relative path."
    pytest.importorskip("transformers", reason="transformers (the [features] extra) is not installed")
    from giblet.features import tiny_backbone
    return tiny_backbone(sherlock.root / "models" / "dino", "image")


def test_one_stream_of_each_kind_named_by_the_study_spec_trains(sherlock, dino, cache, tmp_path, monkeypatch):
    "A spec naming a stream of each kind (models relative to the spec) trains with them from `giblet-train --study` alone."
    from giblet.data.text import load_annotations
    from giblet.features import tiny_backbone
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = sorted({w for t in load_annotations(sherlock.annotations)["text"].dropna() for w in str(t).split()})
    for kind in ("audio", "text"): tiny_backbone(sherlock.root / "models" / kind, kind, words=words)
    stream_spec(sherlock, sherlock.root / "streams.yaml",
                ["video=models/dino:-1:n_frames=2", "audio=models/audio:1", "text=models/text:-1"])
    monkeypatch.chdir(tmp_path)                              # the models resolve against the spec's folder, not the working one
    m = train(tmp_path / "run", cache, "--study", str(sherlock.root / "streams.yaml"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["data"]["features"] == [] and saved["model"]["stream_dims"] == {"video": 16, "audio": 16, "text": 16}
    assert np.isfinite(m["test_voxel_r_selected"])
    sd = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["model"]["state_dict"]
    assert all(any(f".{n}." in k for k in sd) for n in ("stream_video", "stream_audio", "stream_text"))   # a projector each
    assert all(list((cache / "features").glob(f"{kind}-*/features.npy")) for kind in ("video", "audio", "text"))


def test_a_bad_stream_in_the_spec_names_the_file_and_field(sherlock, cache, tmp_path, capsys):
    bad = stream_spec(sherlock, sherlock.root / "bad_stream.yaml", ["video=models/dino:-1", "video=x:1:colour=red"])
    with pytest.raises(SystemExit) as e: cli.giblet_train(["--study", str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{bad}: features[1]: feature stream 'video=x:1:colour=red': unknown or misplaced options" in err
    assert not (tmp_path / "run").exists()


def test_text_streams_read_the_runs_part_and_the_text_columns(sherlock, dino, tmp_path, monkeypatch, caplog):
    """A text stream's words come from each run's annotation part on the film clock, from the run's `text_columns`; streams
    given to the run replace the spec's, and the log says so."""
    import logging
    from giblet.data.text import load_annotations
    from giblet.features import tiny_backbone
    from giblet.study import read_spec
    from giblet.streams import run_words
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = read_spec(spec_file(sherlock, sherlock.root / "study.yaml"))
    words = run_words(spec, 1, spec.runs[1], 1.5, ["Location"])          # run 2 shows part 2, from film time 118.5 s
    part2 = load_annotations(sherlock.annotations, text_columns=["Location"], part=2)
    assert words["word"].tolist() == [w for t in part2["text"] for w in t.split()]
    np.testing.assert_allclose(words["onset"].iloc[0], part2["start"].iloc[0] + 118.5)
    trio = run_words(spec, 1, spec.runs[1], 1.5)
    assert set(trio["word"]) != set(words["word"]) and len(trio) > len(words)
    # from the command line: the config's text stream over the Location column replaces the spec's video stream
    vocab = sorted({w for t in load_annotations(sherlock.annotations, text_columns=["Location"])["text"] for w in t.split()})
    lm = tiny_backbone(tmp_path / "lm", "text", words=vocab)
    path = stream_spec(sherlock, sherlock.root / "streams.yaml", ["video=models/dino:-1:n_frames=2"])
    common = ["--cache-dir", str(tmp_path / "cache"), "--study", str(path), "--config", json.dumps(FAST), "--features", f"text={lm}:-1"]
    with caplog.at_level(logging.WARNING, logger="giblet.training.data"):
        loc = cli.cache_main(**cli.cli_args(cli.cache_main, "giblet-cache", [*common, "--set", 'text_columns=["Location"]']))
    assert loc["streams"] == {"text": [loc["n_trs"], 16]}
    assert any("replace the streams" in r.message and "streams.yaml" in r.message for r in caplog.records)
    default = cli.cache_main(**cli.cli_args(cli.cache_main, "giblet-cache", common))
    assert default["streams"] == loc["streams"]
    assert len(list((tmp_path / "cache" / "features").glob("text-*"))) == 4   # two runs x two word tables: the column is in the key
