"""load_study end to end on the synthetic study: discovery, per-stream caches that are reused, and rebuilt alone when
stale or damaged (truncated, bytes changed in place, NaN written in); each scan read once; leftovers of killed builds,
file modes and a full disk."""
import errno
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from giblet.alignment.sync import FeatureParams
import giblet.io as gio
from giblet.dataset import cache_manifest, load_arrays, load_study, stream_folders, verify_caches
from giblet.study import discover
from giblet.io import DiskFullError, fingerprint_changes, input_fingerprint
from giblet.synthetic import make_dataset

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
    streams = stream_folders(al.cache)
    assert sorted(cache.iterdir()) == sorted([al.cache, *streams.values()]) and sorted(streams) == ["audio", "fmri", "text", "video"]
    assert isinstance(al.video, np.memmap) and not list(cache.glob(".*"))      # no temporary leftovers
    folder = al.cache
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    al2 = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    assert (folder / "manifest.json").stat().st_mtime_ns == mtime          # reused, not rebuilt
    np.testing.assert_array_equal(al2.fmri[1], al.fmri[1])
    # damaged: a truncated array is detected and the cache rebuilt with the same content
    video = np.array(al.video); del al, al2                                # drop the maps before damaging the file
    with open(streams["video"] / "video.npy", "r+b") as f: f.truncate(1000)
    assert load_arrays(streams["video"]) is None
    al3 = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    np.testing.assert_array_equal(al3.video, video)
    # stale: a changed scan gives new keys to the study and its BOLD alone
    os.utime(layout.nii[0], ns=(mtime + 10**9, mtime + 10**9))
    al4 = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    new = stream_folders(al4.cache)
    assert al4.cache != folder and {s for s in new if new[s] != streams[s]} == {"fmri"} and len(list(cache.iterdir())) == 7


def test_cached_bold_matches_the_raw_bold_closely(study, tmp_path):
    from giblet.data.subjects import load_subjects
    root, layout = study
    al = load_study(root / "study", cache_dir=tmp_path / "c", params=PARAMS, show_progress=False)
    raw = load_subjects(layout.nii, al.mask, stop=al.n_trs)
    err = np.abs(al.fmri[0] - raw[0]) / raw[0].std(0).clip(1e-6)
    assert err.max() < 5e-3


# --- content-checked caches -------------------------------------------------------------------------------------


def _build(study_dir, cache, stream="fmri", **kw):
    "The study and the cache folder of one of its streams."
    al = load_study(study_dir, cache_dir=cache, params=PARAMS, show_progress=False, **kw)
    return al, stream_folders(al.cache)[stream]


def _overwrite(path, offset, data):
    with open(path, "r+b") as f: f.seek(offset); f.write(data)


@pytest.mark.parametrize("damage", ["fmri_plausible", "fmri_nan", "video_plausible"])
def test_bytes_changed_in_place_are_detected_and_rebuilt(study, tmp_path, caplog, damage):
    root, _ = study
    name = damage.split("_")[0] + ".npy"
    al, folder = _build(root / "study", tmp_path / "cache", name[:-4])
    fmri, video = np.array(al.fmri[:]), np.array(al.video)
    arr = np.load(folder / name, mmap_mode="r"); off = arr.offset; n = arr.nbytes; del arr, al
    if damage == "fmri_nan": data = np.full(200, np.nan, np.float16).tobytes()
    else: data = (folder / name).read_bytes()[off + n // 2: off + n // 2 + 4000]    # real data from elsewhere in the file
    _overwrite(folder / name, off + 64, data)
    with caplog.at_level(logging.WARNING):
        al2, folder2 = _build(root / "study", tmp_path / "cache", name[:-4])
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
    al, folder = _build(root / "study", tmp_path / "cache")
    man = cache_manifest(folder)
    assert man["files"]["fmri.npy"]["blake2b"] == gio.file_checksum(folder / "fmri.npy")
    assert {f["path"] for f in man["inputs"]} == {str(p.resolve()) for p in layout.nii}       # the BOLD's own inputs
    study = cache_manifest(al.cache)                                                          # the study's: all of them
    assert {f["path"] for f in study["inputs"]} == {str(p.resolve()) for p in (layout.film, layout.annotations, *layout.nii)}
    assert fingerprint_changes(study["inputs"], input_fingerprint([layout.film, layout.annotations, *layout.nii])) == []
    assert {f["path"] for f in cache_manifest(stream_folders(al.cache)["video"])["inputs"]} == {str(layout.film.resolve())}


def test_leftovers_of_a_killed_build_are_removed_on_the_next_load(study, tmp_path):
    root, _ = study
    cache = tmp_path / "cache"; cache.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    new = cache / f".{'0' * 20}.{dead.pid}-{gio.host_tag()}abcd.giblet.tmp"; new.mkdir(); (new / "video.npy").write_bytes(b"x" * 100)
    old = cache / f".{'1' * 20}.k2j_x9q1"; old.mkdir(); os.utime(old, (0, 0))     # unmarked (an older giblet's, or not giblet's): kept
    keep = cache / ".not-ours"; keep.mkdir()
    _build(root / "study", cache)
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == sorted([".not-ours", old.name])


def test_cache_files_get_umask_derived_modes(study, tmp_path):
    root, _ = study
    old = os.umask(0o027)
    try: _build(root / "study", tmp_path / "cache")
    finally: os.umask(old)
    folders = list((tmp_path / "cache").iterdir())
    assert len(folders) == 5 and {f.stat().st_mode & 0o777 for f in folders} == {0o750}
    assert {p.stat().st_mode & 0o777 for f in folders for p in f.iterdir()} == {0o640}


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
    assert not folder.exists() and not [p for p in cache.iterdir() if p.name.startswith(".")]   # no half-built folder
    monkeypatch.undo()
    _, folder = _build(root / "study", cache)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "verified.json"} == \
        {k: v for k, v in before.items() if k != "verified.json"}                  # a rebuild is byte-identical


def test_verify_caches_removes_damaged_caches(study, tmp_path, caplog):
    root, _ = study
    cache = tmp_path / "cache"
    out = load_study(root / "study", cache, show_progress=False, params=PARAMS).cache
    other = load_study(root / "study", cache, show_progress=False, params=FeatureParams(size=(16, 9), n_mels=32, text_dim=64)).cache
    frames = stream_folders(other)["video"]                 # the one stream the two studies do not share
    _overwrite(frames / "video.npy", 300, b"\x01" * 64)
    with caplog.at_level(logging.WARNING): res = verify_caches(cache, show_progress=False)
    assert res["removed"] == [frames] and not frames.exists()
    assert set(res["verified"]) == {out, other, *stream_folders(out).values()} and len(res["verified"]) == 6
    assert f"{frames / 'video.npy'} does not match its checksum" in caplog.text


@pytest.mark.slow   # a fresh process, killed outright
def test_a_build_killed_midway_leaves_nothing_that_survives_the_next_load(study, tmp_path):
    root, _ = study
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
import giblet.dataset as ds, giblet.io as gio
from giblet.alignment.sync import FeatureParams
real = gio.write_file
def write_file(path, write, **kw):
    if path.name == "fmri.npy": print("writing", flush=True); time.sleep(60)
    return real(path, write, **kw)
gio.write_file = write_file
ds.load_study({str(root / 'study')!r}, cache_dir={str(cache)!r}, params=FeatureParams(size=(32, 18), n_mels=32, text_dim=64),
              show_progress=False)
"""], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill(); child.wait(); child.stdout.close()
    left = [p for p in cache.iterdir() if p.name.startswith(".")]   # the BOLD's half-built folder and its scans' local copies
    assert left and all(f".{child.pid}-" in p.name for p in left) and any(p.name.startswith(".bold-") for p in left)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir() if not p.name.startswith(".")) == ["audio", "text", "video"]
    al, _ = _build(root / "study", cache)
    assert sorted(cache.iterdir()) == sorted([al.cache, *stream_folders(al.cache).values()])


def test_discover_ignores_side_files_and_says_so(study, tmp_path, caplog):
    root, layout = study
    d = tmp_path / "cluttered"; shutil.copytree(root / "study", d)
    side = ["participants.tsv", "sub-01_task-movie_events.tsv", "sub-01_desc-confounds_timeseries.tsv",
            "sub-01_desc-confounds_regressors.tsv"]
    for name in side: (d / name).write_text("onset\tduration\n0\t1\n")
    brain = [f"sub-01_{w}.nii.gz" for w in ("space-MNI_desc-brain_mask", "dseg", "label-GM_probseg", "boldref", "T1w")]
    for name in brain: shutil.copy(layout.nii[0], d / "sherlock_nii" / name)
    with caplog.at_level(logging.INFO, logger="giblet.study"): f = discover(d)
    assert f.annotations == d / layout.annotations.name and [p.name for p in f.nii] == [p.name for p in layout.nii]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "ignored 4 file(s) that are not annotation tables" in said and "ignored 5 file(s) that are not subjects' BOLD" in said
    assert all(n in said for n in side + brain)


def test_cache_writer_lets_each_lazy_subject_go_and_never_scales_the_callers_array(tmp_path):
    import weakref
    from giblet.dataset import _DecodedBold, _encode_fmri, save_arrays
    alive, most = [], [0]
    bold = lambda s: np.random.default_rng(s).normal(100 + 50 * s, 5, (40, 30)).astype(np.float32)

    class Lazy:        # a BOLD that makes a subject when indexed and counts how many are still alive then
        shape, ndim, dtype = (4, 40, 30), 3, np.dtype(np.float32)
        def __len__(self): return 4
        def __getitem__(self, s):
            alive[:] = [r for r in alive if r() is not None]; most[0] = max(most[0], len(alive))
            x = bold(s); alive.append(weakref.ref(x)); return x

    center, scale, codes = _encode_fmri(Lazy(), show_progress=False)
    save_arrays(tmp_path / "c", dict(fmri=codes))
    assert most[0] == 0                     # no subject handed over outlives the reading of the next
    back = _DecodedBold(load_arrays(tmp_path / "c")[0]["fmri"], center, scale)
    for s in range(4): np.testing.assert_allclose(back[s], bold(s), rtol=2e-3)
    plain = np.stack([bold(s) for s in range(2)]); keep = plain.copy()
    _encode_fmri(plain, show_progress=False)[2].blocks.__next__()
    np.testing.assert_array_equal(plain, keep)   # an in-memory BOLD is never scaled in place


# --- caches per stream ------------------------------------------------------------------------------------------


def _files(cache):
    "(inode, mtime) of every file of every cache folder, by folder and name."
    return {(f.name, p.name): (p.stat().st_ino, p.stat().st_mtime_ns) for f in cache.iterdir() if not f.name.startswith(".")
            for p in f.iterdir()}


@pytest.mark.parametrize("change,stream", [(dict(params=FeatureParams(size=(16, 9), n_mels=32, text_dim=64)), "video"),
                                           (dict(params=FeatureParams(size=(32, 18), n_mels=16, text_dim=64)), "audio"),
                                           (dict(params=FeatureParams(size=(32, 18), n_mels=32, text_dim=32)), "text"),
                                           (dict(mask_threshold=1.0), "fmri")])
def test_a_change_rebuilds_its_own_stream_alone(study, tmp_path, change, stream):
    root, _ = study
    cache = tmp_path / "cache"
    al = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    before, old = _files(cache), stream_folders(al.cache)
    kw = {"params": PARAMS, **change}
    al2 = load_study(root / "study", cache_dir=cache, show_progress=False, **kw)
    new = stream_folders(al2.cache)
    assert {s for s in new if new[s] != old[s]} == {stream} and al2.cache != al.cache
    after = _files(cache)
    assert {k: v for k, v in after.items() if k in before} == before           # every file of every old cache untouched
    assert {f for f, _ in set(after) - set(before)} == {al2.cache.name, new[stream].name}
    if stream == "video": assert al2.video.shape[2:4] == (9, 16)
    if stream == "audio": assert al2.audio.shape[1] == 16
    if stream == "text": assert al2.text.shape[1] == 32
    if stream == "fmri": assert 0 < al2.n_voxels < al.n_voxels
    for s in {"video", "audio", "text"} - {stream}: np.testing.assert_array_equal(getattr(al2, s), getattr(al, s))
    if stream != "fmri": np.testing.assert_array_equal(al2.fmri[:], al.fmri[:])


def test_a_damaged_stream_is_rebuilt_alone(study, tmp_path, caplog):
    root, _ = study
    cache = tmp_path / "cache"
    al = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    audio, text = np.array(al.audio), np.array(al.text); del al
    before = _files(cache)
    folder = next(f for f in cache.iterdir() if f.name.startswith("audio-"))
    _overwrite(folder / "audio.npy", 200, b"\x07" * 32)
    with caplog.at_level(logging.WARNING): al = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False, verify=True)
    assert f"{folder / 'audio.npy'} does not match its checksum" in caplog.text
    after = _files(cache)
    changed = {f for f in {f for f, _ in before} if any(after.get(k) != v for k, v in before.items() if k[0] == f and k[1] != "verified.json")}
    assert changed == {folder.name}
    np.testing.assert_array_equal(al.audio, audio); np.testing.assert_array_equal(al.text, text)


def test_each_scan_is_read_once_and_the_bold_is_as_before(study, tmp_path, monkeypatch):
    import giblet.data.fmri as fmri
    from giblet.dataset import _encode_fmri
    from giblet.data.fmri import shared_mask
    from giblet.data.subjects import SubjectBold
    root, layout = study
    reads, real = [], fmri.iter_volumes
    def iter_volumes(img, *a, **k):
        reads.append(fmri._name(img)); return real(img, *a, **k)
    monkeypatch.setattr(fmri, "iter_volumes", iter_volumes)
    monkeypatch.setattr(fmri, "nii_to_features", lambda *a, **k: pytest.fail("a scan was read a second time"))
    al = load_study(root / "study", cache_dir=tmp_path / "cache", params=PARAMS, show_progress=False)
    monkeypatch.undo()
    assert sorted(reads) == sorted(str(p) for p in layout.nii)              # one decompression per scan
    # the cached BOLD is byte for byte what the mask and a second read of each scan gave
    mask = shared_mask(layout.nii)
    center, scale, codes = _encode_fmri(SubjectBold([(layout.nii, int(al.volume[0]), int(al.volume[-1]) + 1)], mask), False)
    arrays = load_arrays(stream_folders(al.cache)["fmri"])[0]
    np.testing.assert_array_equal(arrays["mask"], np.asarray(mask.dataobj))
    np.testing.assert_array_equal(arrays["fmri"], np.concatenate(list(codes.blocks)))
    np.testing.assert_array_equal(arrays["fmri_center"], center); np.testing.assert_array_equal(arrays["fmri_scale"], scale)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]       # the local copies are gone


def test_an_intact_cache_that_is_no_study_folder_is_replaced(study, tmp_path):
    from giblet.dataset import save_arrays
    root, _ = study
    cache = tmp_path / "cache"
    folder = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False).cache
    save_arrays(folder, {"video": np.zeros((2, 3), np.uint8)}, meta={"tr": 1.5})   # e.g. a whole study in one folder
    al = load_study(root / "study", cache_dir=cache, params=PARAMS, show_progress=False)
    assert al.cache == folder and sorted(cache_manifest(folder)["meta"]["streams"]) == ["audio", "fmri", "text", "video"]
    assert al.video.ndim == 5


def test_a_stream_ending_early_cuts_every_stream_of_its_run(study, tmp_path, monkeypatch, caplog):
    import giblet.dataset as ds
    root, _ = study
    full = load_study(root / "study", cache_dir=tmp_path / "a", params=PARAMS, show_progress=False)
    real = ds.run_video
    monkeypatch.setattr(ds, "run_video", lambda plan, params: real(plan, params)[:-3])    # a film three TRs short
    with caplog.at_level(logging.WARNING):
        al = load_study(root / "study", cache_dir=tmp_path / "b", params=PARAMS, show_progress=False)
    n = full.n_trs - 3
    assert al.n_trs == n and f"only {n} of {full.n_trs} TR windows are complete in every stream" in caplog.text
    for name in ("video", "audio", "text", "has_text", "tr_start", "volume"):
        np.testing.assert_array_equal(getattr(al, name), np.asarray(getattr(full, name))[:n])
    assert al.texts == full.texts[:n] and al.fmri.shape == (2, n, full.n_voxels)
    np.testing.assert_array_equal(al.fmri[1], full.fmri[1][:n])       # the BOLD cache holds the whole grid; the study its rows
    assert load_arrays(stream_folders(al.cache)["fmri"])[0]["fmri"].shape[1] == full.n_trs
