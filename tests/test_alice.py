"""The Alice study (tests/data/alice): a real, openly licensed fMRI study without a film, read through its study spec and trained end to end."""
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from giblet import cli
from giblet.dataset import load_spec
from giblet.study import read_spec
from giblet.study_plan import study_predictors

ALICE = Path(__file__).parent / "data" / "alice"
UNITS = ["LATL", "RATL", "LPTL", "LIPL", "LPreM", "LIFG"]


def test_every_file_matches_the_sha256_in_its_readme():
    listed = dict((p, h) for h, p in re.findall(r"^([0-9a-f]{64})  (\S+)$", (ALICE / "README.md").read_text(), re.M))
    present = {p.relative_to(ALICE).as_posix() for p in ALICE.rglob("*") if p.is_file() and p.name != "README.md"}
    assert set(listed) == present, f"README lists {sorted(set(listed) ^ present)} differently from the folder"
    bad = [p for p, h in listed.items() if hashlib.sha256((ALICE / p).read_bytes()).hexdigest() != h]
    assert not bad, f"changed since the README was written: {bad}"
    assert "Creative Commons Attribution 4.0" in (ALICE / "LICENSE-data.txt").read_text()
    assert "public domain" in (ALICE / "stimuli" / "LICENSE-stimuli.txt").read_text()


@pytest.fixture(scope="module")
def alice(tmp_path_factory):
    spec = read_spec(ALICE / "alice.yaml")
    return spec, load_spec(spec, tmp_path_factory.mktemp("cache"), show_progress=False)


def test_the_spec_reads_27_subjects_6_regions_and_no_film(alice):
    spec, al = alice
    assert spec.tables and spec.film is None and spec.units == UNITS and len(spec.subjects) == 27 and "s33" not in spec.subjects
    assert al.fmri.shape == (27, 362, 6) and al.video is None and al.audio is None and al.mask is None and al.units == UNITS
    raw = np.loadtxt(ALICE / "10mm" / "s22-timecourses.txt")
    np.testing.assert_allclose(al.fmri[1], raw, rtol=1e-6)               # s22 is the second subject, every volume kept
    snd = study_predictors(spec, al)["sndpwr"]
    np.testing.assert_allclose(snd[:, 0], np.loadtxt(ALICE / "sndpwr.txt"), rtol=1e-6)


def test_each_tr_holds_the_words_spoken_in_its_window(alice):
    "Volume 0 is 20 s into the audio (scan_offset -10 at TR 2 s): TR i holds the words spoken in [20 + 2i, 22 + 2i) s."
    _, al = alice
    np.testing.assert_allclose(al.tr_start[:3], [20, 22, 24])
    words = pd.read_csv(ALICE / "words.tsv", sep="\t")
    for i in (0, 57, 200, 361):
        inside = words[(words.end > 20 + 2 * i) & (words.onset < 22 + 2 * i)].text
        assert set(inside) == set(al.texts[i].split(" | ")) if len(inside) else al.texts[i] == "", i
    assert al.texts[0].startswith("Alice | was | beginning") and al.has_text.mean() > 0.95


def test_alice_trains_end_to_end_from_its_spec(tmp_path):
    "giblet-train --study alice.yaml: a text-and-predictor model (no video or audio parts), the protocol, and a report per region."
    out = tmp_path / "run"
    argv = ["--study", str(ALICE / "alice.yaml"), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--epochs", "2",
            "--device", "cpu", "--config", json.dumps(dict(progress=False))]
    m = cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))
    assert m["n_train_trs"] + len(m["val_trs"]) + len(m["test_trs"]) <= 362 and m["n_train_trs"] > 150
    for k in ("test_voxel_r_selected", "banded_ridge_test_voxel_r_selected", "ridge_test_voxel_r_selected", "stack_test_voxel_r_selected"):
        assert np.isfinite(m[k]), k
    assert m["in_words"] and all(("below" in s or "above" in s or "level" in s) for s in m["in_words"])
    ckpt = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    mc = ckpt["model"]["config"]
    assert mc["modalities"] == ["text"] and mc["stream_dims"] == {"sndpwr": 1}
    assert not any(k.split(".")[1] in ("video", "audio") for k in ckpt["model"]["state_dict"])   # no frame or mel parts at all
    pred = pd.read_csv(out / "test_pred.tsv", sep="\t", index_col=0)
    assert list(pred.columns) == UNITS and len(pred) == len(m["test_trs"])
    assert not (out / "test_pred.nii.gz").exists() and (out / "stack_weights.tsv").is_file()
    report = (out / "report.md").read_text()
    assert all(f"| {u} |" in report for u in UNITS) and "'stream_sndpwr': 1" in report
    assert {(r["modality"]) for r in m["decoding"]["scores"]} == {"text"}


def test_a_constant_subject_is_refused_by_name(tmp_path):
    "The release's s33 holds only zeros; a spec naming it is refused, naming the file."
    (tmp_path / "s33.txt").write_text("0 0\n" * 20)
    (tmp_path / "s1.txt").write_text("".join(f"{i % 3} {i % 5}\n" for i in range(20)))
    (tmp_path / "w.tsv").write_text("onset\tend\ttext\n1\t2\thello\n")
    (tmp_path / "spec.yaml").write_text("tr: 2\nannotations: w.tsv\nruns:\n  - bold: {s1: s1.txt, s33: s33.txt}\n")
    with pytest.raises(ValueError, match=r"s33.txt: column\(s\) \[0, 1\] of the BOLD table are constant"):
        load_spec(read_spec(tmp_path / "spec.yaml"), tmp_path / "cache")
