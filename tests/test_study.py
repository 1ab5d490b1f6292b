"""Study specs end to end: a two-run synthetic study through a spec file and through BIDS, annotation parts, errors."""
import logging
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from giblet.alignment.sync import FeatureParams
from giblet.synthetic import load_truth, make_dataset
from giblet.data.video import psnr
from giblet.dataset import load_spec
from giblet.study import SpecError, StudySpec, bids_spec, read_spec, resolve_study, spec_to_dict, sherlock_spec, write_spec
from giblet.study_plan import check_spec, plan_subjects, show_study, spec_mask

KW = dict(n_subjects=2, n_trs=80, n_runs=2, seed=5, shape=(10, 12, 10), size=(32, 18))
PARAMS = FeatureParams(size=(32, 18), n_mels=16, text_dim=32)


@pytest.fixture(scope="module")
def sherlock(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("study") / "sherlock", **KW)


@pytest.fixture(scope="module")
def bids(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("study") / "bids", layout="bids", **KW)


def _spec_file(lay, path, **extra):
    "A hand-written YAML spec of a synthetic study, paths relative to the spec's folder."
    rel = lambda p: str(p.relative_to(lay.root))
    runs = [dict(name=f"run-{i + 1}", film_start=r["film_start"], film_stop=r["film_stop"], scan_offset=r["scan_offset"],
                 part=r["part"], nii={f"s{k + 1}": rel(p) for k, p in enumerate(r["nii"])}) for i, r in enumerate(lay.runs)]
    path.write_text(yaml.safe_dump({"tr": 1.5, "film": rel(lay.film), "annotations": rel(lay.annotations), **extra,
                                    "runs": runs}))
    return path


@pytest.fixture(scope="module")
def loaded(sherlock, bids, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    spec = _spec_file(sherlock, sherlock.root / "study.yaml")
    return load_spec(spec, cache, PARAMS, show_progress=False), load_spec(bids.root, cache, PARAMS, show_progress=False)


def test_spec_file_and_bids_give_the_same_study(loaded, sherlock):
    a, b = loaded
    for name in ("text", "has_text", "tr_start", "run", "volume", "audio"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)
    np.testing.assert_array_equal(np.asarray(a.fmri[:]), np.asarray(b.fmri[:]))
    assert a.texts == b.texts and a.tr == b.tr == 1.5
    assert psnr(np.asarray(a.video), np.asarray(b.video)) > 40      # two separate encodes of the same frames
    # run 1 scans one volume before its segment, run 2's volume 0 is 2 TRs into its segment
    (v1, o1), (v2, o2) = [(len(r["nii"]) and nib.load(r["nii"][0]).shape[3], r["scan_offset"]) for r in sherlock.runs]
    assert (o1, o2) == (1, -2)
    np.testing.assert_array_equal(a.volume[a.run == 0], np.arange(1, v1))
    np.testing.assert_array_equal(a.volume[a.run == 1], np.arange(v2))
    np.testing.assert_allclose(a.tr_start[a.run == 1], (np.arange(v2) + 2) * 1.5)


def test_bold_follows_the_planted_truth(loaded, sherlock):
    "The loaded BOLD of each run lines up with the truth's volumes of that run (wrong offsets would decorrelate it)."
    al = loaded[0]
    truth = np.load(sherlock.truth)
    bold, roi, t_run, t_vol = truth["bold"], truth["roi"], truth["run"], truth["volume"]
    inside = np.asarray(al.mask.dataobj)[truth["brain_mask"] > 0] > 0
    x = np.asarray(al.fmri[:]).mean(0)[:, (roi[inside] > 0)]
    rows = [np.flatnonzero((t_run == r) & (t_vol == v))[0] for r, v in zip(al.run, al.volume)]
    y = bold[rows][:, inside][:, roi[inside] > 0]
    z = lambda m: (m - m.mean(0)) / m.std(0)
    for run in (0, 1):                                   # each run's scan has its own baseline: z-score per run
        r = (z(x[al.run == run]) * z(y[al.run == run])).mean(0)
        shifted = (z(x[al.run == run][3:]) * z(y[al.run == run][:-3])).mean(0)
        assert r.mean() > 0.5 and r.mean() > shifted.mean() + 0.2, (run, r.mean(), shifted.mean())
    # the film shown on each kept TR is the one the truth planted on that volume: brightness peaks at lag 0
    light = np.asarray(al.video, np.float32).mean(axis=(1, 2, 3, 4))
    planted = truth["factors"][rows, 0]
    for run in (0, 1):
        v, f = light[al.run == run], planted[al.run == run]
        lag_r = {L: np.corrcoef(v[max(0, -L):len(v) - max(0, L)], f[max(0, L):len(f) - max(0, -L)])[0, 1] for L in range(-3, 4)}
        assert max(lag_r, key=lag_r.get) == 0 and lag_r[0] > 0.95, (run, lag_r)


def _part_rows(lay):
    raw = pd.read_excel(lay.annotations)
    restart = np.flatnonzero(np.diff(raw["Start Time (s) "].to_numpy()) < 0) + 1
    assert len(restart) == 1
    return raw.iloc[:restart[0]], raw.iloc[restart[0]:]


def test_text_never_comes_from_the_other_part(loaded, sherlock):
    al = loaded[0]
    parts = _part_rows(sherlock)
    details = [set(p["Scene Details - A Level "]) for p in parts]
    for run, rows in enumerate(parts):
        only_other = details[1 - run] - details[run]
        assert only_other                                   # some sentences are unique to the other part
        s, e, what = rows["Start Time (s) "].to_numpy(), rows["End Time (s) "].to_numpy(), rows["Scene Details - A Level "]
        for t0, text in zip(al.tr_start[al.run == run], np.array(al.texts, dtype=object)[al.run == run]):
            want = set(what[(s < t0 + 1.5) & (e > t0)])     # this part's rows overlapping the TR, on the part's clock
            assert all(w in text for w in want), (run, t0, want, text)
            assert not any(w in text for w in only_other), (run, t0, text)


def test_spec_round_trip_and_show(bids, tmp_path):
    spec = bids_spec(bids.root)
    assert spec.subjects == ["sub-01", "sub-02"] and [r.part for r in spec.runs] == [1, 2]
    assert [r.scan_offset for r in spec.runs] == [1.0, -2.0] and spec.film == bids.film
    back = read_spec(write_spec(spec, tmp_path / "spec.yaml"))
    assert back == StudySpec(**{**spec.__dict__, "source": str(tmp_path / "spec.yaml")})
    assert read_spec(write_spec(spec, tmp_path / "spec.json")).runs == spec.runs
    text = show_study(spec)
    assert "run-2" in text and "volume 0 is 2 TRs into the segment" in text and "part 2" in text and "sub-02" in text


def test_bids_ignores_unrelated_files_and_reads_derivatives(bids, tmp_path):
    root = shutil.copytree(bids.root, tmp_path / "bids")
    func = root / "sub-01" / "func"
    (func / "sub-01_task-movie_run-1_desc-confounds_timeseries.tsv").write_text("csf\n1\n")
    (func / "sub-01_task-movie_run-1_physio.json").write_text("{}")
    (root / "sub-01" / "anat").mkdir()
    (root / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{}")
    assert spec_to_dict(bids_spec(root), root) == spec_to_dict(bids_spec(bids.root), bids.root)
    der = root / "derivatives" / "fmriprep"
    der.mkdir(parents=True)
    (der / "dataset_description.json").write_text('{"Name": "fmriprep", "BIDSVersion": "1.8.0", "DatasetType": "derivative",'
                                                  ' "GeneratedBy": [{"Name": "fMRIPrep"}]}')
    for p in root.glob("sub-*/func/*_bold.nii.gz"):
        d = der / p.relative_to(root).parent
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / p.name.replace("_bold", "_space-MNI152NLin2009cAsym_desc-preproc_bold"))
    shutil.copy(root / "stimuli" / "film.m4v", root / "stimuli" / "part2.m4v")    # run 2 shows its own film file
    for p in root.glob("sub-*/func/*_run-2_events.tsv"):
        ev = pd.read_csv(p, sep="\t"); ev["stim_file"] = "part2.m4v"; ev.to_csv(p, sep="\t", index=False)
    spec = bids_spec(root)
    assert spec.film is None and [r.film.name for r in spec.runs] == ["film.m4v", "part2.m4v"]
    p = next(root.glob("sub-02/func/*_run-2_events.tsv"))
    kept = p.read_text()
    ev = pd.read_csv(p, sep="\t"); ev["onset"] = 0.0; ev.to_csv(p, sep="\t", index=False)
    with pytest.raises(ValueError, match="run-2: subjects disagree on the film, its onset"): bids_spec(root)
    p.unlink()
    with pytest.raises(FileNotFoundError, match="sub-02_task-movie_run-2_bold.nii.gz: expected one events file"): bids_spec(root)
    p.write_text(kept)
    spec = bids_spec(root, space="MNI152NLin2009cAsym")
    assert all("derivatives" in str(p) and "space-MNI152NLin2009cAsym" in p.name for r in spec.runs for p in r.nii.values())
    assert [r.scan_offset for r in spec.runs] == [1.0, -2.0] and check_spec(spec) == 1.5


def test_errors_name_the_file_and_field(sherlock, tmp_path):
    spec = _spec_file(sherlock, sherlock.root / "bad.yaml", tr=2.0)
    with pytest.raises(ValueError, match=r"sherlock_movie_s1_run1.nii.gz: the NIfTI header says TR = 1.5 s, but .*bad.yaml says 2 s"):
        check_spec(read_spec(spec))
    d = yaml.safe_load(spec.read_text()); d["tr"] = 1.5
    d["runs"][1]["nii"]["s2"] = "sherlock_nii/missing.nii.gz"
    spec.write_text(yaml.safe_dump(d))
    with pytest.raises(FileNotFoundError, match=r"bad.yaml: missing files:\n  - run-2.nii.s2: .*missing.nii.gz"):
        check_spec(read_spec(spec))
    d["runs"][0]["scan_ofset"] = 1
    spec.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError, match=r"bad.yaml: runs\[0\].scan_ofset: unknown field"): read_spec(spec)
    spec.write_text("tr: [1.5\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"): read_spec(spec)
    with pytest.raises(ValueError, match="look like runs"): sherlock_spec(sherlock.root)


def test_short_subject_is_warned_or_dropped(sherlock, tmp_path, caplog):
    spec = read_spec(_spec_file(sherlock, sherlock.root / "short.yaml"))
    p = spec.runs[0].nii["s2"]
    img = nib.load(p)
    short = tmp_path / "s2_short.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., :30], img.affine, img.header), short)
    spec.runs[0].nii["s2"] = short
    with caplog.at_level(logging.WARNING, logger="giblet.study_plan"):
        assert plan_subjects(spec, 1.5).subjects == ["s1", "s2"]
    assert "s2 (run-1: 29 of 39 TRs)" in caplog.text and "drop_short=True" in caplog.text
    dropped = plan_subjects(spec, 1.5, drop_short=True)
    assert dropped.subjects == ["s1"] and all(list(r.nii) == ["s1"] for r in dropped.runs)


def test_one_run_sherlock_layout_and_mask_file(tmp_path, caplog):
    lay = make_dataset(tmp_path / "one", n_subjects=2, n_trs=40, seed=1, shape=(10, 12, 10), size=(32, 18))
    with caplog.at_level(logging.INFO, logger="giblet.study"):
        spec = resolve_study(lay.root)
    assert "part 1" in caplog.text and len(spec.runs) == 1 and spec.runs[0].part == 1 and spec.subjects == [
        "sherlock_movie_s1", "sherlock_movie_s2"]
    mask = np.zeros((10, 12, 10), np.uint8); mask[3:6, 4:8, 3:6] = 1
    nib.save(nib.Nifti1Image(mask, nib.load(lay.nii[0]).affine), tmp_path / "roi.nii.gz")
    spec.mask = tmp_path / "roi.nii.gz"
    al = load_spec(spec, tmp_path / "cache", PARAMS, show_progress=False)
    assert al.n_voxels == int(mask.sum()) and al.n_subjects == 2 and (al.run == 0).all()
    # volume 0 before the film, said either way: a film start 1.5 s before stimulus time 0, or one volume of scan offset
    early = load_spec(replace(spec, runs=[replace(spec.runs[0], film_start=-1.5)]), tmp_path / "cache", PARAMS, show_progress=False)
    offset = load_spec(replace(spec, runs=[replace(spec.runs[0], scan_offset=1)]), tmp_path / "cache", PARAMS, show_progress=False)
    assert early.volume[0] == offset.volume[0] == 1 and early.texts == offset.texts
    np.testing.assert_array_equal(np.asarray(early.video), np.asarray(offset.video))
    np.testing.assert_array_equal(np.asarray(early.fmri[:]), np.asarray(offset.fmri[:]))
    np.testing.assert_allclose(early.tr_start, offset.tr_start + 1.5)   # each on its own stimulus clock
    spec.mask = "nonzero"                                   # the synthetic scans are 0 exactly outside the brain
    np.testing.assert_array_equal(np.asarray(spec_mask(spec).dataobj), load_truth(lay)["brain_mask"])


def test_spec_loading_shares_the_cache_path_and_bold_is_normalised_per_run(loaded, sherlock, caplog):
    from giblet.dataset import block_split, cache_manifest, fit_normaliser, stream_folders
    a, _ = loaded
    folder = a.cache                                                                 # the study folder, joining the streams
    man = cache_manifest(folder)
    assert man["inputs"] and all("blake2b" in f for f in man["files"].values())     # fingerprint and checksums
    assert man["meta"]["runs"] == ["run-1", "run-2"]
    before = np.asarray(a.fmri[:])
    with open(stream_folders(folder)["fmri"] / "fmri.npy", "r+b") as f: f.seek(-8, 2); f.write(b"\x00" * 8)  # damage in place
    with caplog.at_level(logging.WARNING):
        again = load_spec(sherlock.root / "study.yaml", folder.parent, PARAMS, show_progress=False, verify=True)
    assert "does not match its checksum" in caplog.text
    np.testing.assert_array_equal(np.asarray(again.fmri[:]), before)
    a = again
    split = block_split(a.n_trs, a.tr, val_frac=0.25, gap=6)
    nz = fit_normaliser(a.fmri, a.audio, split.train)                # the cached BOLD carries its runs
    assert nz.run_ids.tolist() == [0, 1] and nz.run_mean.shape == (2, 2, a.n_voxels)
    for r in (0, 1):
        tr = split.train[a.run[split.train] == r]
        z = nz.zscore(1, a.fmri[1][tr], a.run[tr])
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-3); np.testing.assert_allclose(z.std(0), 1, atol=1e-3)


def test_a_spec_study_reads_each_scan_once_and_shares_the_bold_across_frame_sizes(bids, tmp_path, monkeypatch):
    "The path giblet-train takes (a spec, the shared mask): one decompression per scan, and a frame-size change rebuilds the frames alone."
    import giblet.data.fmri as fmri
    from giblet.dataset import stream_folders
    reads, real = [], fmri.iter_volumes
    def iter_volumes(img, *a, **k):
        reads.append(fmri._name(img)); return real(img, *a, **k)
    monkeypatch.setattr(fmri, "iter_volumes", iter_volumes)
    monkeypatch.setattr(fmri, "nii_to_features", lambda *a, **k: pytest.fail("a scan was read a second time"))
    cache = tmp_path / "cache"
    al = load_spec(bids.root, cache, PARAMS, show_progress=False)
    scans = sorted(str(p) for r in bids.runs for p in r["nii"])
    assert sorted(reads) == scans
    reads.clear()
    al2 = load_spec(bids.root, cache, FeatureParams(size=(16, 9), n_mels=16, text_dim=32), show_progress=False)
    assert reads == []                                            # the BOLD came from its cache
    old, new = stream_folders(al.cache), stream_folders(al2.cache)
    assert {s for s in new if new[s] != old[s]} == {"video"} and al2.video.shape[2:4] == (9, 16)
    np.testing.assert_array_equal(al2.fmri[:], al.fmri[:])
