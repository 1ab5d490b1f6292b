"""A real study as a user sees it (issue 23): a spec with an atlas trains into a report with a row per region,
`--show-study` prints the resolved timing without building the cache, and BOLD pre-shifted by 3 TRs is warned of."""
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import yaml

from giblet import cli
from giblet.alignment.sync import FeatureParams
from giblet.baselines import fit_baselines, stimulus_bands
from giblet.dataset import load_spec
from giblet.study import read_spec
from giblet.synthetic import make_dataset
from giblet.training.data import study_spec
from conftest import QUICK_32

KW = dict(n_subjects=2, n_trs=160, seed=5, shape=(10, 12, 10), size=(32, 18))
FAST = QUICK_32   # giblet-train's --config for these 32 x 18 studies


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    "A one-run synthetic study, an atlas on its grid (left and right halves, a named TSV) and a spec naming both."
    lay = make_dataset(tmp_path_factory.mktemp("study") / "s", **KW)
    ref = nib.load(lay.runs[0]["nii"][0])
    lab = np.zeros(ref.shape[:3], np.int16); lab[:5] = 1; lab[5:] = 2
    nib.save(nib.Nifti1Image(lab, ref.affine), lay.root / "atlas.nii.gz")
    (lay.root / "atlas.tsv").write_text("index\tname\n1\tleft\n2\tright\n")
    return lay


def write_spec(lay, path, nii=None, scan_offset=None, **top):
    "A YAML spec of the synthetic study (its one run), optionally with other NIfTIs and scan offset."
    r = lay.runs[0]
    run = dict(name="run-1", film_start=r["film_start"], film_stop=r["film_stop"], part=r["part"],
               scan_offset=r["scan_offset"] if scan_offset is None else scan_offset,
               nii={f"s{k + 1}": str(p) for k, p in enumerate(nii or r["nii"])})
    path.write_text(yaml.safe_dump(dict(tr=1.5, film=str(lay.film), annotations=str(lay.annotations), runs=[run], **top)))
    return path


def test_show_study_prints_the_resolved_timing_without_building_a_cache(study, tmp_path, capsys):
    spec = write_spec(study, tmp_path / "spec.yaml", atlas=str(study.root / "atlas.nii.gz"))
    cli.giblet_train(["--study", str(spec), "--show-study", "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert "resolved timing" in out and "film_first_s" in out and "film_last_s" in out and "part" in out
    row = next(l for l in out.splitlines() if l.strip().startswith("run-1") and "xlsx" in l and "film " not in l)
    assert row.split()[1:5] == ["160", "0", "159", "160"], row        # volumes, first and last kept volume, TRs kept
    assert "voxels: " in out and "mask: the shared mask" in out and "shared mask: " in out
    assert not (tmp_path / "cache").exists()                           # nothing decoded, nothing cached


def test_an_atlas_gives_the_report_a_row_per_region(study, tmp_path):
    spec = write_spec(study, study.root / "atlas_spec.yaml", atlas="atlas.nii.gz", atlas_names="atlas.tsv")
    out = tmp_path / "run"
    argv = ["--study", str(spec), "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--device", "cpu",
            "--threads", "1", "--config", json.dumps(FAST)]
    m = cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))
    assert [r["region"] for r in m["roi_table"]] == ["all", "selected", "left", "right"]
    rt = {r["region"]: r for r in m["region_table"]}
    assert set(rt) == {"left", "right"} and sum(r["n_voxels"] for r in rt.values()) == m["n_voxels"]
    for r in rt.values():
        assert r["model_ci_low"] <= r["model"] <= r["model_ci_high"] and r["model_verdict"] in ("ahead", "level", "behind")
        assert {"stack", "banded_ridge", "ridge", "noise_ceiling", "stack_model_share"} <= set(r)
    report = (out / "report.md").read_text()
    assert "| left |" in report and "| right |" in report and "model − banded ridge" in report and "stack − banded ridge" in report
    pred = nib.load(out / "baseline_test_pred.nii.gz")                   # the banded ridge's test prediction, beside the model's
    assert pred.shape == nib.load(out / "test_pred.nii.gz").shape and (out / "ridge_test_pred.nii.gz").is_file()
    assert json.loads((out / "config.json").read_text())["train"]["run"]["threads"] == 1


def test_atlas_from_the_command_line_and_a_wrong_grid_is_refused_before_training(study, tmp_path):
    spec = write_spec(study, tmp_path / "spec.yaml")
    cfg = cli.train_config(study=str(spec), atlas=str(study.root / "atlas.nii.gz"), atlas_names=str(study.root / "atlas.tsv"))
    got = study_spec(cfg)
    assert got.atlas == study.root / "atlas.nii.gz" and got.atlas_names == study.root / "atlas.tsv"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), tmp_path / "small.nii.gz")
    argv = ["--study", str(spec), "--out", str(tmp_path / "run"), "--atlas", str(tmp_path / "small.nii.gz"), "--device", "cpu"]
    with pytest.raises(ValueError, match="small.nii.gz: the atlas's grid"):
        cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("offset_fix,warned", [(0, True), (-3, False)])
def test_bold_pre_shifted_by_3_trs_is_warned_of(study, tmp_path, caplog, offset_fix, warned):
    "BOLD shifted 3 TRs earlier (its first 3 volumes cut, as tutorial kits ship it): without scan_offset -3 the banded ridge's weight peaks at 0 s."
    shifted = []
    for k, p in enumerate(study.runs[0]["nii"]):
        img = nib.load(p)
        shifted.append(tmp_path / f"s{k + 1}.nii.gz")
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 3:], img.affine, img.header), shifted[-1])
    spec = write_spec(study, tmp_path / "spec.yaml", shifted, scan_offset=study.runs[0]["scan_offset"] + offset_fix)
    al = load_spec(read_spec(spec), tmp_path / "cache", params=FeatureParams(size=(32, 18), n_mels=16, text_dim=32), show_progress=False)
    y = np.mean([np.asarray(al.fmri[i]) for i in range(al.n_subjects)], 0)
    y = (y - y.mean(0)) / np.where(y.std(0) > 0, y.std(0), 1)
    train = np.arange(int(0.8 * al.n_trs))
    with caplog.at_level(logging.WARNING, "giblet.baselines"):
        fit = fit_baselines(stimulus_bands(al.video, al.audio, al.text, al.has_text), y[train], train, al.run, al.tr, n_iter=5)
    assert fit.info["lag"]["preshifted"] == (fit.info["lag"]["peak_s"] <= 0) == warned, fit.info["lag"]
    assert ("scan_offset: -3" in caplog.text) == warned
