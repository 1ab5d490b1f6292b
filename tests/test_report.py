"""The run's report: decoding scores from the predicted brain and from measured fMRI beside their shifted null, the planted
truth per factor with a CI against the banded ridge, and the truth of a multi-run study read at the right rows."""
import json

import nibabel as nib
import numpy as np
import pytest

from giblet.synthetic import load_truth, make_dataset
from giblet.baselines import fit_baselines, stimulus_bands
from giblet.evaluation import WORDS, factor_table, headline_words
from giblet.stacking import cv_stack_weights, model_share, stack
from giblet.synthetic_truth import embedded_dataset, truth_rows, truth_scores
from giblet.report import write_report
from giblet.metrics import voxel_r
from giblet.training.config import TrainConfig
from giblet.training.data import prepare_data
from giblet.training.trainer import Trainer
from conftest import FAST, SMALL


def test_multi_run_truth_reads_each_runs_own_rows(tmp_path):
    "Run 1's volume v is row (run 0's length + v) of the truth: scoring the planted signal itself there gives r = 1."
    truth = load_truth(make_dataset(tmp_path / "s", n_subjects=1, n_trs=60, n_runs=2, seed=2, shape=(10, 12, 10), size=(32, 18)))
    n0 = int((truth["run"] == 0).sum())
    assert set(np.unique(truth["run"])) == {0, 1} and 0 < n0 < len(truth["bold"])
    vols = np.arange(5, int((truth["run"] == 1).sum()))
    runs = np.ones_like(vols)
    np.testing.assert_array_equal(truth_rows(truth, vols, runs), n0 + vols)
    mask = nib.Nifti1Image(np.asarray(truth["brain_mask"], np.uint8), truth["affine"])
    pred = np.asarray(truth["bold"])[n0 + vols][:, :]  # the noise-free signal of run 1, one column per brain voxel
    s = truth_scores(pred, vols, truth, mask, runs)
    assert s["truth_r_responsive_mean"] > 0.999
    wrong = truth_scores(np.asarray(truth["bold"])[vols], vols, truth, mask, runs)  # run 0's rows: what per-run indices read
    assert wrong["truth_r_responsive_mean"] < 0.9
    with pytest.raises(ValueError, match="several runs"): truth_scores(pred, vols, truth, mask)
    with pytest.raises(ValueError, match="no row"): truth_rows(truth, vols + 1000, runs)


def test_factor_table_ci_follows_the_difference():
    "Model minus banded ridge per factor: ahead where the model carries the factor's signal, behind where only the baseline does."
    rng = np.random.default_rng(1)
    sig = np.cumsum(rng.standard_normal((240, 4)), 0)
    truth = dict(brain_mask=np.ones((4, 1, 1), np.uint8), affine=np.eye(4), roi=np.array([1, 1, 2, 2]), roi_names=("none", "a", "b"),
                 bold=sig, factor_names=("f1", "f2"), factor_roi=np.array([1, 2]))
    mask = nib.Nifti1Image(np.ones((4, 1, 1), np.uint8), np.eye(4))
    noise = 3 * rng.standard_normal((2, 240, 4))
    model, ridge = noise[0].copy(), noise[1].copy()
    model[:, :2] += sig[:, :2]; ridge[:, 2:] += sig[:, 2:]
    t = factor_table({"model": model, "banded_ridge": ridge}, truth, mask, np.arange(240), tr=1.5, n_boot=300)
    assert list(t.index) == ["f1", "f2"] and t.loc["f1", "verdict"] == "ahead" and t.loc["f2", "verdict"] == "behind"
    assert (t.ci_low <= t.difference).all() and (t.difference <= t.ci_high).all()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "giblet-cache"
    study = embedded_dataset(cache, **(SMALL | dict(n_trs=240)))  # a test block long enough for a 30 s null
    cfg = TrainConfig.make(**(FAST | dict(subjects="each", test_frac=0.35)), data_dir=str(study), cache_dir=str(cache))
    tr = Trainer(prepare_data(cfg), cfg)
    tr.fit()
    out = tmp_path_factory.mktemp("run")
    m = write_report(tr, out, n_boot=200)
    return out, m, tr


def test_report_writes_decoding_scores_beside_their_null(report):
    "metrics.json holds every modality's decoding score from both brain series, each with its CI and shifted null; so do report.md and a figure."
    out, m, tr = report
    d = json.loads((out / "metrics.json").read_text())["decoding"]
    assert d["block"] == "test" and d["min_shift_s"] >= 30 and d["n_trs"] == len(tr.data.split.test)
    keys = {(r["source"], r["modality"], r["score"]) for r in d["scores"]}
    assert keys == {(s, mod, sc) for s in ("brain", "fmri") for mod, sc in
                    [("video", "frame_r"), ("video", "top1"), ("audio", "band_r"), ("audio", "top1"), ("text", "top1"), ("text", "top5")]}
    for r in d["scores"]:
        assert r["ci_lo"] <= r["value"] <= r["ci_hi"] and r["null_mean"] is not None and 0 < r["p"] <= 1
    assert "Decoding on the test block" in (out / "report.md").read_text()
    assert (out / "figures" / "decoding.png").stat().st_size > 1000


def test_report_gives_the_planted_truth_per_factor(report):
    "Each planted ROI has the model's and both baselines' r with the noise-free signal and a CI of model minus banded ridge."
    out, m, tr = report
    f = json.loads((out / "metrics.json").read_text())["truth_factors"]
    truth = load_truth(tr.data.data_dir)
    assert len(f) == len(np.unique(truth["roi"][truth["roi"] > 0]))
    for r in f:
        assert {"model", "banded_ridge", "ridge"} <= set(r) and r["ci_low"] <= r["difference"] <= r["ci_high"]
        assert r["verdict"] in ("ahead", "level", "behind")
    assert "Planted truth per factor" in (out / "report.md").read_text()


def test_report_stacks_the_model_with_the_banded_ridge_by_the_validation_block(report):
    "The stack is a·model + c·banded ridge per voxel, (a, c) fitted (and shrunk by cross-validation) on the validation block; the test block scores it with a CI, per factor too."
    out, m, tr = report
    ev, data = m["_eval"], tr.data
    w, p, sp, al = ev["stack_weights"], ev["preds"], data.split, data.aligned
    assert w.shape == (2, al.n_voxels) and (w >= 0).all() and 0 <= np.nanmean(model_share(w)) < 1
    np.testing.assert_array_equal(p["stack"], stack(p["model"], p["banded_ridge"], w))
    base = fit_baselines(stimulus_bands(al.video, al.audio, al.text, al.has_text), data.average_bold(sp.train), sp.train, al.run, al.tr)
    on_val, choice = cv_stack_weights(ev["val_pred"], base.predict("banded_ridge", sp.val), data.average_bold(sp.val))
    np.testing.assert_allclose(w, on_val, atol=1e-5)
    assert choice["choice"] == m["stack_weights"]["choice"]
    if choice["choice"] == "baseline alone":   # two epochs on 48 validation TRs: the model has not earned a weight, and the stack is the ridge
        np.testing.assert_allclose(voxel_r(p["stack"], data.average_bold(sp.test)), voxel_r(p["banded_ridge"], data.average_bold(sp.test)), atol=1e-5)
    else: assert 0 < np.nanmean(model_share(w))
    saved_err = m["stack_weights"]["cv_error"]
    for k, e in choice["cv_error"].items(): np.testing.assert_allclose(saved_err[k], e, rtol=1e-6)   # chosen on the validation block ...
    on_test = cv_stack_weights(p["model"], p["banded_ridge"], data.average_bold(sp.test))[1]["cv_error"]   # ... not on the test block
    assert max(abs(on_test[k] / saved_err[k] - 1) for k in saved_err) > 0.05
    saved = json.loads((out / "metrics.json").read_text())
    d = saved["stack_comparison"]["differences"]["banded_ridge"]
    assert d["ci_low"] <= d["difference"] <= d["ci_high"] and saved["stack_verdict"] == d["verdict"]
    np.testing.assert_allclose(saved["stack_test_voxel_r_selected"], d["difference"] + saved["banded_ridge_test_voxel_r_selected"], atol=1e-6)
    for r in saved["stack_truth_factors"]:
        assert r["ci_low"] <= r["difference"] <= r["ci_high"] and np.isclose(r["difference"], r["stack"] - r["banded_ridge"])
    assert "stacked with the banded ridge" in (out / "report.md").read_text()
    img = nib.load(out / "stack_weights.nii.gz")   # the weights as a brain map: volume 0 the model's, 1 the ridge's
    np.testing.assert_array_equal(np.asarray(img.dataobj)[np.asarray(al.mask.dataobj) > 0].T, w)


def test_report_says_the_point_estimates_in_words(report):
    "Each difference's side in words with its CI, whether the test block resolves 0.05 (and the TRs it would need), the per-voxel signs."
    out, m, tr = report
    saved, md, ev = json.loads((out / "metrics.json").read_text()), (out / "report.md").read_text(), m["_eval"]
    below_0 = sum(c["means"]["model"]["r"] < 0 for c in (saved["comparison"], saved["stack_comparison"]))
    assert saved["in_words"] == headline_words(saved) and len(saved["in_words"]) == 3 + below_0   # vs both baselines, the stack vs one
    for name, c in (("model", saved["comparison"]), ("stack", saved["stack_comparison"])):
        for k, d in c["differences"].items():
            x = d["difference"]   # exactly 0 where the stack kept the banded ridge alone
            s = (f"{name} {'below' if x < 0 else 'above' if x > 0 else 'level with'} {WORDS[k]}{f' by {abs(x):.3f}' if x else ''} "
                 f"(CI {d['ci_low']:+.3f} to {d['ci_high']:+.3f}")
            assert f"- {s}" in md and any(w.startswith(s) for w in saved["in_words"])
    d, res = saved["comparison"]["differences"]["banded_ridge"], saved["test_block_resolution"]
    hw = (d["ci_high"] - d["ci_low"]) / 2
    assert res["n_test_trs"] == len(tr.data.split.test) and np.isclose(res["ci_half_width"], hw)
    assert abs(res["trs_needed"] - res["n_test_trs"] * (hw / 0.05) ** 2) <= 1 and res["too_short"] == (hw > 0.05)
    assert ("**Test block too short**" in md) == res["too_short"] == (f"about {res['trs_needed']} test TRs" in md)
    r, sel = ev["scores"]["model"], ev["selected"]
    assert saved["voxel_signs"] == pytest.approx(dict(n_selected=int(sel.sum()), model_below_0=(r[sel] < 0).mean(),
        **{f"model_below_{k}": (r[sel] < ev["scores"][k][sel]).mean() for k in ("banded_ridge", "ridge")}))
    assert f"over the {int(sel.sum())} headline voxels, the model's test r is below 0 in {(r[sel] < 0).mean():.0%}" in md
