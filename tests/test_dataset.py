"""load_study end to end on the synthetic study: discovery, a cache that is reused, and rebuilt when stale or damaged
(truncated, bytes changed in place, NaN written in); leftovers of killed builds, file modes and a full disk."""
import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from giblet.alignment.sync import FeatureParams
import giblet.io as gio
from giblet.data.dataset import cache_main, cache_manifest, discover, load_arrays, load_study
from giblet.io import DiskFullError, fingerprint_changes, input_fingerprint
from giblet.data.synthetic import make_dataset

PARAMS = FeatureParams(size=(32, 18), n_mels=32, text_dim=64)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("s")
    layout = make_dataset(root / "study", n_subjects=2, n_trs=60, seed=3)
    return root, layout


def test_discover_finds_the_sherlock_layout(study):
    root, layout = study
    f = discover(root / "study")
    assert f.film == layout.film and f.annotations == layout.annotations and f.nii == list(layout.nii)


def test_discover_lists_everything_missing(study, tmp_path):
    root, layout = study
    d = tmp_path / "partial"; shutil.copytree(root / "study", d)
    os.remove(d / layout.film.name); shutil.rmtree(d / "sherlock_nii")
    with pytest.raises(FileNotFoundError) as e: discover(d)
    assert "no film file" in str(e.value) and "no fMRI" in str(e.value) and str(d) in str(e.value)
    shutil.copy(d / layout.annotations.name, d / "other.csv")
    with pytest.raises(FileNotFoundError, match="2 annotation files"): discover(d)


def test_cache_is_reused_then_rebuilt_when_stale_or_damaged(study, tmp_path):
    root, layout = study
    cache = tmp_path / "cache"
    al = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    assert al.video.dtype == np.uint8 and al.video.shape[1:] == (19, 18, 32, 3)
    assert al.fmri.shape[:2] == (2, al.n_trs) and al.n_trs <= 60
    (folder,) = list(cache.iterdir())
    assert isinstance(al.video, np.memmap) and not list(cache.glob(".*"))      # no temporary leftovers
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    al2 = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime          # reused, not rebuilt
    np.testing.assert_array_equal(al2.fmri[1], al.fmri[1])
    # damaged: a truncated array is detected and the cache rebuilt with the same content
    video = np.array(al.video); del al, al2                                # drop the maps before damaging the file
    with open(folder / "video.npy", "r+b") as f: f.truncate(1000)
    assert load_arrays(folder) is None
    al3 = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    np.testing.assert_array_equal(al3.video, video)
    # stale: a changed input gives a new key (and a new cache folder)
    os.utime(layout.nii[0], ns=(mtime + 10**9, mtime + 10**9))
    load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    assert len(list(cache.iterdir())) == 2
    # a different parameter also gives a new key
    load_study(root / "study", cache_dir=cache, params=FeatureParams(size=(32, 18), n_mels=16, text_dim=64),
               show_progress=False)
    assert len(list(cache.iterdir())) == 3


def test_cached_bold_matches_the_raw_bold_closely(study, tmp_path):
    from giblet.data.fmri import load_subjects
    root, layout = study
    al = load_study(root / "study", cache_dir=tmp_path / "c", params=PARAMS, show_progress=False)
    raw = load_subjects(layout.nii, al.mask, stop=al.n_trs)
    err = np.abs(al.fmri[0] - raw[0]) / raw[0].std(0).clip(1e-6)
    assert err.max() < 5e-3


# --- content-checked caches -------------------------------------------------------------------------------------


def _build(study_dir, cache, **kw):
    al = load_study(study_dir, cache_dir=cache, params=PARAMS, show_progress=False, **kw)
    return al, Path(al.video.filename).parent


def _overwrite(path, offset, data):
    with open(path, "r+b") as f: f.seek(offset); f.write(data)


@pytest.mark.parametrize("damage", ["fmri_plausible", "fmri_nan", "video_plausible"])
def test_bytes_changed_in_place_are_detected_and_rebuilt(study, tmp_path, caplog, damage):
    root, _ = study
    al, folder = _build(root / "study", tmp_path / "cache")
    fmri, video = np.array(al.fmri[:]), np.array(al.video)
    name = damage.split("_")[0] + ".npy"
    arr = np.load(folder / name, mmap_mode="r"); off = arr.offset; n = arr.nbytes; del arr, al
    if damage == "fmri_nan": data = np.full(200, np.nan, np.float16).tobytes()
    else: data = (folder / name).read_bytes()[off + n // 2: off + n // 2 + 4000]    # real data from elsewhere in the file
    _overwrite(folder / name, off + 64, data)
    with caplog.at_level(logging.WARNING):
        al2, folder2 = _build(root / "study", tmp_path / "cache")
    assert folder2 == folder
    assert any(str(folder / name) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records), caplog.text
    np.testing.assert_array_equal(al2.fmri[:], fmri); np.testing.assert_array_equal(al2.video, video)


def test_damage_with_the_time_stamp_restored_is_caught_by_verify(study, tmp_path, caplog):
    root, _ = study
    al, folder = _build(root / "study", tmp_path / "cache"); del al
    old = (folder / "fmri.npy").stat().st_mtime_ns - 3600 * 10**9
    for p in folder.glob("*.npy"): os.utime(p, ns=(old, old))
    _build(root / "study", tmp_path / "cache")                       # checked (time stamps changed) and recorded
    assert (folder / "verified.json").exists()
    _overwrite(folder / "fmri.npy", 200, b"\x00\x3c" * 50)
    os.utime(folder / "fmri.npy", ns=(old, old))
    with caplog.at_level(logging.WARNING): _build(root / "study", tmp_path / "cache")   # sizes and time stamps look right
    assert "checksum" not in caplog.text
    with caplog.at_level(logging.WARNING): _build(root / "study", tmp_path / "cache", verify=True)
    assert f"{folder / 'fmri.npy'} does not match its checksum" in caplog.text


def test_manifest_holds_checksums_and_the_input_fingerprint(study, tmp_path):
    root, layout = study
    _, folder = _build(root / "study", tmp_path / "cache")
    man = cache_manifest(folder)
    assert man["files"]["fmri.npy"]["blake2b"] == gio.file_checksum(folder / "fmri.npy")
    assert {f["path"] for f in man["inputs"]} == {str(p.resolve()) for p in (layout.film, layout.annotations, *layout.nii)}
    assert fingerprint_changes(man["inputs"], input_fingerprint([layout.film, layout.annotations, *layout.nii])) == []


def test_leftovers_of_a_killed_build_are_removed_on_the_next_load(study, tmp_path):
    root, _ = study
    cache = tmp_path / "cache"; cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    new = cache / f".{'0' * 20}.{dead.pid}-{gio.host_tag()}abcd.tmp"; new.mkdir(); (new / "video.npy").write_bytes(b"x" * 100)
    old = cache / f".{'1' * 20}.k2j_x9q1"; old.mkdir(); os.utime(old, (0, 0))     # an older giblet's mkdtemp name
    keep = cache / ".not-ours"; keep.mkdir()
    _build(root / "study", cache)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [".not-ours"]


def test_cache_files_get_umask_derived_modes(study, tmp_path):
    root, _ = study
    old = os.umask(0o027)
    try: _, folder = _build(root / "study", tmp_path / "cache")
    finally: os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o640}


def test_full_disk_at_the_cache_is_one_line_naming_the_folder(study, tmp_path, monkeypatch):
    root, _ = study
    cache = tmp_path / "cache"
    _, folder = _build(root / "study", cache)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    # known to be too small before writing
    monkeypatch.setattr(gio.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4032, 4032))
    with pytest.raises(DiskFullError) as e:
        load_study(root / "study", cache_dir=cache, params=FeatureParams(size=(16, 9), n_mels=32, text_dim=64),
                   show_progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"no space left in {cache} for " in msg and "needs" in msg and "4.0 kB free" in msg, msg
    monkeypatch.undo()
    # the disk fills midway through the BOLD (the space check passed)
    real = gio.HashingWriter.write
    def write(self, b):
        if self.n + memoryview(b).nbytes > 20_000: raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, b)
    monkeypatch.setattr(gio.HashingWriter, "write", write)
    shutil.rmtree(folder)
    with pytest.raises(DiskFullError) as e: load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    assert "\n" not in str(e.value) and f"no space left in {cache} for {folder.name}" in str(e.value)
    assert list(cache.iterdir()) == []                                             # no half-built folder
    monkeypatch.undo()
    _, folder = _build(root / "study", cache)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "verified.json"} == \
        {k: v for k, v in before.items() if k != "verified.json"}                  # a rebuild is byte-identical


def test_cache_main_builds_and_verify_removes_damaged_caches(study, tmp_path, caplog):
    root, _ = study
    cache = tmp_path / "cache"
    out = cache_main(root / "study", cache, show_progress=False, params=PARAMS)
    other = cache_main(root / "study", cache, show_progress=False,
                       params=FeatureParams(size=(16, 9), n_mels=32, text_dim=64))["study"]
    _overwrite(other / "audio.npy", 300, b"\x01" * 64)
    with caplog.at_level(logging.WARNING): res = cache_main(None, cache, verify=True, show_progress=False)
    assert res["verified"] == [out["study"]] and res["removed"] == [other] and not other.exists()
    assert f"{other / 'audio.npy'} does not match its checksum" in caplog.text
    with pytest.raises(ValueError, match="give a study folder"): cache_main(None, cache)


def test_a_build_killed_midway_leaves_nothing_that_survives_the_next_load(study, tmp_path):
    root, _ = study
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
import giblet.data.dataset as ds
from giblet.alignment.sync import FeatureParams
real = ds.write_file
def write_file(path, write, **kw):
    if path.name == "fmri.npy": print("writing", flush=True); time.sleep(60)
    return real(path, write, **kw)
ds.write_file = write_file
ds.load_study({str(root / 'study')!r}, cache_dir={str(cache)!r}, params=FeatureParams(size=(32, 18), n_mels=32, text_dim=64),
              show_progress=False)
"""], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill(); child.wait(); child.stdout.close()
    (left,) = list(cache.iterdir())
    assert left.name.startswith(".") and f".{child.pid}-" in left.name and (left / "video.npy").exists()
    _, folder = _build(root / "study", cache)
    assert list(cache.iterdir()) == [folder]


def test_discover_ignores_side_files_and_says_so(study, tmp_path, caplog):
    root, layout = study
    d = tmp_path / "cluttered"; shutil.copytree(root / "study", d)
    side = ["participants.tsv", "sub-01_task-movie_events.tsv", "sub-01_desc-confounds_timeseries.tsv",
            "sub-01_desc-confounds_regressors.tsv"]
    for name in side: (d / name).write_text("onset\tduration\n0\t1\n")
    brain = [f"sub-01_{w}.nii.gz" for w in ("space-MNI_desc-brain_mask", "dseg", "label-GM_probseg", "boldref", "T1w")]
    for name in brain: shutil.copy(layout.nii[0], d / "sherlock_nii" / name)
    with caplog.at_level(logging.INFO, logger="giblet.data.dataset"): f = discover(d)
    assert f.annotations == d / layout.annotations.name and [p.name for p in f.nii] == [p.name for p in layout.nii]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "ignored 4 file(s) that are not annotation tables" in said and "ignored 5 file(s) that are not subjects' BOLD" in said
    assert all(n in said for n in side + brain)


def test_cache_writer_lets_each_lazy_subject_go_and_never_scales_the_callers_array(tmp_path):
    import weakref
    import nibabel as nib
    from giblet.alignment.sync import Aligned
    from giblet.data.dataset import aligned_to_arrays, arrays_to_aligned, save_arrays
    alive, most = [], [0]
    bold = lambda s: np.random.default_rng(s).normal(100 + 50 * s, 5, (40, 30)).astype(np.float32)

    class Lazy:        # a BOLD that makes a subject when indexed and counts how many are still alive then
        shape, ndim, dtype = (4, 40, 30), 3, np.dtype(np.float32)
        def __len__(self): return 4
        def __getitem__(self, s):
            alive[:] = [r for r in alive if r() is not None]; most[0] = max(most[0], len(alive))
            x = bold(s); alive.append(weakref.ref(x)); return x

    n = 40
    al = Aligned(video=np.zeros((n, 2, 4, 6, 3), np.uint8), audio=np.zeros((n, 5, 3), np.float32),
                 text=np.zeros((n, 8), np.float32), has_text=np.zeros(n, bool), fmri=Lazy(), tr=1.5,
                 tr_start=np.arange(n) * 1.5, run=np.zeros(n, int), volume=np.arange(n), texts=[""] * n,
                 mask=nib.Nifti1Image(np.ones((30, 1, 1), np.uint8), np.eye(4)))
    save_arrays(tmp_path / "c", *aligned_to_arrays(al, show_progress=False))
    assert most[0] == 0                     # no subject handed over outlives the reading of the next
    back = arrays_to_aligned(*load_arrays(tmp_path / "c"))
    for s in range(4): np.testing.assert_allclose(back.fmri[s], bold(s), rtol=2e-3)
    plain = np.stack([bold(s) for s in range(2)]); keep = plain.copy()
    aligned_to_arrays(Aligned(**{**al.__dict__, "fmri": plain}), show_progress=False)[0]["fmri"].blocks.__next__()
    np.testing.assert_array_equal(plain, keep)   # an in-memory BOLD is never scaled in place
