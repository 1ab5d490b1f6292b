"""File-level tests of giblet.data.fmri and giblet.data.subjects: real NIfTI variants, round trips through disk, bad files, many subjects."""
import gzip
import logging
import shutil
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import giblet.data.fmri as fmri
from giblet.data.bold_stats import ZScoreStats, apply_zscore, average_subjects, zscore, zscore_stats
from giblet.data.fmri import (features_to_nii, find_niftis, iter_volumes, load_nifti, nii_to_features, read_tr, shared_mask,
                              sort_subjects, temporal_std)
from giblet.data.subjects import MaskRule, OnePassBold, SubjectBold, load_subjects

NIBDATA = Path(nib.__file__).parent / "tests" / "data"
REAL = ["functional.nii", "example4d.nii.gz", "example_nifti2.nii.gz"]
LOG = "giblet.data.fmri"


def scan(shape=(6, 5, 4), n_trs=40, seed=0, tr=1.5, dtype=np.int16, affine=None, slope=None, inter=None):
    "An int16 (or other dtype) 4-D scan: a box of noisy 'brain' voxels around 1000 inside zeros."
    rng = np.random.default_rng(seed)
    data = np.zeros(shape + (n_trs,), np.float64)
    data[1:-1, 1:-1, 1:-1] = 1000 + rng.normal(0, 20, (shape[0] - 2, shape[1] - 2, shape[2] - 2, n_trs))
    img = nib.Nifti1Image(data.astype(dtype), np.diag([3.0, 3.0, 3.0, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = tr
    if slope is not None: img.header.set_slope_inter(slope, inter)
    return img


def write(img, path):
    nib.save(img, path)
    return Path(path)


# --- real NIfTI variants -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", REAL)
def test_real_files_tr_and_exact_round_trip(name, tmp_path, caplog):
    path = NIBDATA / name
    with caplog.at_level(logging.WARNING, LOG):
        assert read_tr(path) == 2.0
    mask = shared_mask([path])
    m = np.asarray(mask.dataobj).astype(bool)
    x = nii_to_features(path, mask)
    img = nib.load(path)
    assert x.dtype == np.float32 and x.shape == (img.shape[3], m.sum())
    # the scaled values (scl_slope / scl_inter applied), voxels in the mask's C order
    np.testing.assert_array_equal(x, np.asarray(img.dataobj, np.float64)[m].T.astype(np.float32))
    # features -> NIfTI on disk (.nii.gz) -> features is bit-exact
    out = write(features_to_nii(x, mask, tr=2.0), tmp_path / "back.nii.gz")
    y = nii_to_features(out, mask)
    assert y.dtype == np.float32 and np.array_equal(x.view(np.uint32), y.view(np.uint32))
    assert read_tr(out) == 2.0
    back = np.asarray(nib.load(out).dataobj)
    assert (back[~m] == 0).all()
    np.testing.assert_allclose(nib.load(out).affine, img.affine, atol=1e-6)


def test_millisecond_tr_labelled_seconds_warns(caplog):
    with caplog.at_level(logging.WARNING, LOG):
        assert read_tr(NIBDATA / "example4d.nii.gz") == 2.0
    assert any("example4d.nii.gz" in r.getMessage() and "msec" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOG):
        assert read_tr(NIBDATA / "functional.nii") == 2.0
    assert not caplog.records


def test_tr_units_and_errors(tmp_path, caplog):
    img = scan(n_trs=3)
    for unit, raw, want in [("sec", 1.5, 1.5), ("msec", 1500, 1.5), ("usec", 2_000_000, 2.0), ("msec", 0.8, 0.8)]:
        img.header.set_xyzt_units("mm", unit); img.header["pixdim"][4] = raw
        with caplog.at_level(logging.WARNING, LOG):
            assert read_tr(img) == pytest.approx(want)
    img.header.set_xyzt_units("mm", "unknown"); img.header["pixdim"][4] = 2.0
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOG):
        assert read_tr(img) == 2.0
    assert "no time unit" in caplog.text
    img.header.set_xyzt_units("mm", "sec")
    for raw in [0.0, -1.0, np.nan]:
        img.header["pixdim"][4] = raw
        p = write(img, tmp_path / "zero_tr.nii")
        with pytest.raises(ValueError, match=r"zero_tr\.nii: no TR in the header"):
            read_tr(p)
    img.header["pixdim"][4] = 50_000_000_000
    with pytest.raises(ValueError, match="implausible in any time unit"):
        read_tr(img)
    p3 = write(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), tmp_path / "anat.nii.gz")
    with pytest.raises(ValueError, match=r"anat\.nii\.gz: image is 3-D"):
        read_tr(p3)


# --- bad input ----------------------------------------------------------------------------------------------------

def test_truncated_gz_names_file_and_volume(tmp_path):
    good = write(scan(shape=(20, 20, 20), n_trs=30), tmp_path / "good.nii.gz")
    raw = good.read_bytes()
    bad = tmp_path / "sub-01_bold.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    img = load_nifti(bad)  # the header is intact; the data stream is cut short
    mask = np.ones((20, 20, 20), bool)
    with pytest.raises(ValueError, match=r"sub-01_bold\.nii\.gz: cannot read volume \d+ of 30; the file is truncated"):
        nii_to_features(bad, mask)
    with pytest.raises(ValueError, match=r"sub-01_bold\.nii\.gz: cannot read volume"):
        shared_mask([good, bad])
    assert img.shape == (20, 20, 20, 30)


def test_truncated_nii_fails_on_open(tmp_path):
    good = write(scan(n_trs=10), tmp_path / "good.nii")
    bad = tmp_path / "short.nii"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"short\.nii: file is truncated"):
        load_nifti(bad)
    with pytest.raises(ValueError, match=r"short\.nii: file is truncated"):
        read_tr(bad)


@pytest.mark.parametrize("content", [b"not a nifti at all" * 50, gzip.compress(b"\0" * 100), b""])
def test_corrupt_files(tmp_path, content):
    for suffix in [".nii", ".nii.gz"]:
        p = tmp_path / f"corrupt{suffix}"
        p.write_bytes(content)
        with pytest.raises(ValueError, match=rf"corrupt{suffix.replace('.', '[.]')}: not a readable NIfTI"):
            nii_to_features(p, np.ones((2, 2, 2), bool))


def test_corrupt_gz_payload(tmp_path):
    good = write(scan(shape=(16, 16, 16), n_trs=20), tmp_path / "good.nii.gz")
    raw = bytearray(good.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)  # damaged deflate stream
    bad = tmp_path / "damaged.nii.gz"
    bad.write_bytes(bytes(raw))
    # the damage may decode silently; the gzip checksum, verified after the last volume, catches it
    with pytest.raises(ValueError, match=r"damaged\.nii\.gz: .*corrupt"):
        nii_to_features(bad, np.ones((16, 16, 16), bool))
    with pytest.raises(ValueError, match=r"damaged\.nii\.gz: .*corrupt"):  # also when only a prefix is read
        nii_to_features(bad, np.ones((16, 16, 16), bool), stop=2)


def test_missing_file_and_3d_where_4d_needed(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.nii\.gz: no such NIfTI file"):
        nii_to_features(tmp_path / "nope.nii.gz", np.ones((2, 2, 2), bool))
    p3 = write(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "t1.nii.gz")
    for call in [lambda: nii_to_features(p3, np.ones((4, 4, 4), bool)), lambda: shared_mask([p3]),
                 lambda: load_subjects([p3], np.ones((4, 4, 4), bool))]:
        with pytest.raises(ValueError, match=r"t1\.nii\.gz: image is 3-D with shape \(4, 4, 4\); expected a 4-D"):
            call()
    # and a 4-D image where a 3-D mask is needed
    p4 = write(scan(n_trs=3), tmp_path / "bold.nii.gz")
    with pytest.raises(ValueError, match=r"bold\.nii\.gz: image is 4-D"):
        nii_to_features(p4, p4)


def test_nan_voxels_excluded_with_warning(tmp_path, caplog):
    a = scan(seed=1, dtype=np.float32)
    data = np.asarray(scan(seed=2, dtype=np.float32).dataobj).copy()
    data[2, 2, 2, 7] = np.nan
    data[3, 2, 1, :] = np.inf
    b = nib.Nifti1Image(data, a.affine, a.header)
    pa, pb = write(a, tmp_path / "s1.nii.gz"), write(b, tmp_path / "s2.nii.gz")
    with caplog.at_level(logging.WARNING, LOG):
        mask = shared_mask([pa, pb], threshold=0.5)
    assert "s2.nii.gz: 2 voxels hold NaN or infinite values; excluded from the mask" in caplog.text
    m = np.asarray(mask.dataobj)
    assert m[2, 2, 2] == 0 and m[3, 2, 1] == 0
    x = nii_to_features(pb, mask)  # loads clean with the shared mask
    assert np.isfinite(x).all()
    with pytest.raises(ValueError, match=r"s2\.nii\.gz: 1 in-mask voxels are NaN or infinite at TR 0"):
        nii_to_features(pb, np.ones(m.shape, bool))


def test_constant_voxels_excluded_and_zscore_safe(tmp_path):
    img = scan(seed=3)
    data = np.asarray(img.dataobj).copy()
    data[2, 2, 2, :] = 1234  # a constant in-brain voxel
    p = write(nib.Nifti1Image(data, img.affine, img.header), tmp_path / "s1.nii.gz")
    std, nonfinite = temporal_std(p)
    assert std[2, 2, 2] == 0 and not nonfinite.any()
    mask = shared_mask([p])
    assert np.asarray(mask.dataobj)[2, 2, 2] == 0
    # z-scoring a constant column (e.g. from a broader mask) gives 0, never inf/NaN, with no numpy warning
    x = nii_to_features(p, np.ones(data.shape[:3], bool))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z, st = zscore(x, trs=slice(0, 30))
    assert np.isfinite(z).all() and (z[:, st.std == 0] == 0).all() and (st.std == 0).sum() > 1


def test_empty_folder_and_numeric_order(tmp_path):
    with pytest.raises(FileNotFoundError, match="no NIfTI files"):
        find_niftis(tmp_path)
    with pytest.raises(FileNotFoundError, match="no NIfTI files"):
        load_subjects(tmp_path, np.ones((2, 2, 2), bool))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        find_niftis(tmp_path / "missing")
    names = [f"sherlock_movie_s{i}.nii.gz" for i in [10, 1, 17, 2, 9]] + ["sub3.nii", ".hidden.nii.gz", "x.txt"]
    for n in names: (tmp_path / n).touch()
    got = [p.name for p in find_niftis(tmp_path)]
    assert got == ["sherlock_movie_s1.nii.gz", "sherlock_movie_s2.nii.gz", "sherlock_movie_s9.nii.gz",
                   "sherlock_movie_s10.nii.gz", "sherlock_movie_s17.nii.gz", "sub3.nii"]
    assert [p.name for p in sort_subjects(["a/s10.nii", "b/s2.nii"])] == ["s2.nii", "s10.nii"]


# --- shape / affine mismatches ------------------------------------------------------------------------------------

def test_mismatched_subjects_are_named(tmp_path):
    pa = write(scan(), tmp_path / "s1.nii.gz")
    pb = write(scan(shape=(6, 5, 5)), tmp_path / "s2.nii.gz")
    shifted = np.diag([3.0, 3.0, 3.0, 1.0]); shifted[0, 3] = 10
    pc = write(scan(affine=shifted), tmp_path / "s3.nii.gz")
    with pytest.raises(ValueError, match=r"differ in volume shape from .*s1\.nii\.gz.*s2\.nii\.gz \(6, 5, 5\)"):
        shared_mask([pa, pb])
    with pytest.raises(ValueError, match=r"differ in affine .*s1\.nii\.gz.*: .*s3\.nii\.gz"):
        shared_mask([pa, pc])
    mask = shared_mask([pa])
    with pytest.raises(ValueError, match=r"s2\.nii\.gz: volume shape \(6, 5, 5\) does not match the mask's"):
        nii_to_features(pb, mask)
    with pytest.raises(ValueError, match=r"s3\.nii\.gz: its affine differs from the mask's"):
        nii_to_features(pc, mask)


# --- masks, features ----------------------------------------------------------------------------------------------

def test_shared_mask_threshold_and_percentile(tmp_path):
    n = 4
    paths = []
    for s in range(n):
        img = scan(seed=s, n_trs=50, dtype=np.float32)
        data = np.asarray(img.dataobj).copy()
        data[1, 1, 1] = 1000 + (s == 0) * np.random.default_rng(9).normal(0, 50, 50)  # signal in subject 0 only
        paths.append(write(nib.Nifti1Image(data, img.affine, img.header), tmp_path / f"s{s + 1}.nii.gz"))
    for threshold, kept in [(0.25, 1), (0.5, 0), (1.0, 0)]:
        assert np.asarray(shared_mask(paths, threshold=threshold).dataobj)[1, 1, 1] == kept
    m1 = np.asarray(shared_mask(paths[:1]).dataobj)
    std, _ = temporal_std(paths[0])
    nz = std[std > 0]
    assert m1.sum() == (nz > np.percentile(nz, 10)).sum()
    np.testing.assert_allclose(std, np.asarray(nib.load(paths[0]).dataobj, np.float64).std(-1), rtol=1e-9, atol=1e-9)
    mask = shared_mask(tmp_path)  # a folder works too
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    np.testing.assert_array_equal(mask.affine, nib.load(paths[0]).affine)
    with pytest.raises(ValueError, match="threshold"):
        shared_mask(paths, threshold=0)


def test_scaled_int16_features(tmp_path):
    img = scan(slope=0.5, inter=-100.0)
    p = write(img, tmp_path / "scaled.nii.gz")
    loaded = nib.load(p)
    assert loaded.dataobj.slope == 0.5 and loaded.dataobj.inter == -100.0
    mask = shared_mask([p])
    x = nii_to_features(p, mask)
    raw = np.asarray(loaded.dataobj.get_unscaled()).astype(np.float64) * 0.5 - 100
    np.testing.assert_array_equal(x, raw[np.asarray(mask.dataobj) > 0].T.astype(np.float32))


def test_features_to_nii_inverse_on_disk(tmp_path):
    p = write(scan(), tmp_path / "s.nii.gz")
    mask_path = write(shared_mask([p]), tmp_path / "mask.nii.gz")
    x = nii_to_features(p, mask_path)
    rng = np.random.default_rng(0)
    f = rng.standard_normal(x.shape).astype(np.float32)
    f[0, 0] = np.float32(1e-38); f[1, 1] = -0.0; f[2, 2] = np.finfo(np.float32).max
    for suffix in [".nii", ".nii.gz"]:
        out = write(features_to_nii(f, mask_path), tmp_path / f"f{suffix}")
        g = nii_to_features(out, mask_path)
        assert np.array_equal(f.view(np.uint32), g.view(np.uint32))
    with pytest.raises(ValueError, match="features must be"):
        features_to_nii(f[:, 1:], mask_path)
    with pytest.raises(ValueError, match="needs the mask as a NIfTI"):
        features_to_nii(f, np.asarray(nib.load(mask_path).dataobj))


def test_streaming_memory_is_output_plus_a_few_volumes(tmp_path):
    shape, n_trs = (40, 40, 40), 200
    p = write(scan(shape=shape, n_trs=n_trs), tmp_path / "big.nii.gz")
    mask = np.zeros(shape, bool); mask[1:-1, 1:-1, 1:-1] = True
    vol64 = np.prod(shape) * 8
    out_bytes = n_trs * mask.sum() * 4
    tracemalloc.start()
    x = nii_to_features(p, mask)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert x.nbytes == out_bytes
    # the whole scan as float64 would be 200 volumes (102 MB); streaming needs the output plus a few volumes
    assert peak < out_bytes + 6 * vol64, (peak, out_bytes, vol64)


# --- many subjects ------------------------------------------------------------------------------------------------

def test_load_subjects_order_lengths_memmap(tmp_path):
    folder = tmp_path / "sherlock_nii"; folder.mkdir()
    lengths = {1: 40, 2: 40, 10: 36}
    for s, n in lengths.items(): write(scan(seed=s, n_trs=n), folder / f"sherlock_movie_s{s}.nii.gz")
    paths = find_niftis(folder)
    mask = shared_mask(paths)
    with pytest.raises(ValueError, match=r"different numbers of TRs .*s10\.nii\.gz: 36.*pass stop="):
        load_subjects(folder, mask)
    with pytest.raises(ValueError, match=r"shorter than the 38 TRs requested: .*s10\.nii\.gz: 36"):
        load_subjects(folder, mask, stop=38)
    x = load_subjects(folder, mask, stop=36)
    assert x.shape == (3, 36, int(np.asarray(mask.dataobj).sum())) and x.dtype == np.float32
    for i, p in enumerate(paths):  # s1, s2, s10 in that order
        np.testing.assert_array_equal(x[i], nii_to_features(p, mask, stop=36))
    dest = tmp_path / "cache" / "bold.npy"; dest.parent.mkdir()
    mm = load_subjects(paths, mask, start=4, stop=36, out=dest)
    assert isinstance(mm, np.memmap) and not mm.flags.writeable
    np.testing.assert_array_equal(mm, x[:, 4:])
    assert [q.name for q in dest.parent.iterdir()] == ["bold.npy"]  # no temp file left behind
    # a failure midway leaves no file and no temp file
    bad = tmp_path / "bad.nii.gz"; shutil.copy(paths[0], bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"bad\.nii\.gz: cannot read volume"):
        load_subjects([paths[0], bad], mask, out=tmp_path / "cache" / "broken.npy")
    assert [q.name for q in dest.parent.iterdir()] == ["bold.npy"]
    pre = np.zeros((3, 36, x.shape[2]), np.float32)
    assert load_subjects(paths, mask, stop=36, out=pre) is pre and np.array_equal(pre, x)


def test_zscore_on_train_trs_and_reuse(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.normal(0, 1, (3, 100, 50)) * rng.uniform(1, 5, (3, 1, 50)) + rng.uniform(0, 1000, (3, 1, 50)))
    x = x.astype(np.float32)
    train = np.r_[0:60]
    z, st = zscore(x, trs=train)
    assert z.dtype == np.float32 and st.mean.shape == (3, 50)
    np.testing.assert_allclose(st.mean, x[:, train].astype(np.float64).mean(1), rtol=1e-12)
    np.testing.assert_allclose(st.std, x[:, train].astype(np.float64).std(1), rtol=1e-12)
    np.testing.assert_allclose(z[:, train].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, train].std(1), 1, atol=1e-5)
    # test TRs do not leak into the statistics
    y = x.copy(); y[:, 80:] += 500
    assert np.array_equal(zscore_stats(y, train).mean, st.mean)
    # stats saved and reloaded give the same z-scores, in place too
    st.save(tmp_path / "stats.npz")
    st2 = ZScoreStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(st2.trs, train)
    inplace = x.copy()
    assert apply_zscore(inplace, st2, out=inplace) is inplace
    np.testing.assert_array_equal(inplace, z)
    # a memmapped stack works, statistics equal to the in-memory ones
    np.save(tmp_path / "x.npy", x)
    zm, stm = zscore(np.load(tmp_path / "x.npy", mmap_mode="r"), trs=np.arange(100) < 60)
    np.testing.assert_array_equal(zm, z)
    with pytest.raises(ValueError, match="do not fit"):
        apply_zscore(x[0], st)
    with pytest.raises(ValueError, match="bool TR mask"):
        zscore(x, trs=np.ones(5, bool))


def test_average_subjects_memmap(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (4, 30, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    avg = average_subjects(np.load(tmp_path / "x.npy", mmap_mode="r"))
    np.testing.assert_array_equal(avg, x.astype(np.float64).mean(0).astype(np.float32))
    np.testing.assert_array_equal(average_subjects(x, exclude=[0, 3]), x[1:3].astype(np.float64).mean(0).astype(np.float32))
    with pytest.raises(ValueError, match="out of range"):
        average_subjects(x, exclude=4)


def test_iter_volumes_range_and_in_memory():
    img = scan(n_trs=5)
    vols = list(iter_volumes(img, 1, 3))
    assert len(vols) == 2 and np.array_equal(vols[1], np.asarray(img.dataobj)[..., 2])
    with pytest.raises(ValueError, match="volumes 2..9 requested, the file has 5"):
        list(iter_volumes(img, 2, 9))


# --- masks for preprocessed (z-scored) data and mask files ---------------------------------------------------------

def zscored_runs(seed, shape=(8, 7, 6), n_trs=(60, 50)):
    "A brain box z-scored run by run and the runs concatenated, as in common releases; zeros outside the brain."
    rng = np.random.default_rng(seed)
    runs = []
    for n in n_trs:
        x = 1000 + rng.normal(0, 1, shape[:3] + (n,)) * rng.uniform(5, 50, shape[:3] + (1,))  # varied raw stds
        runs.append((x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True))
    data = np.zeros(shape + (sum(n_trs),), np.float32)
    data[1:-1, 1:-1, 1:-1] = np.concatenate(runs, -1)[1:-1, 1:-1, 1:-1]
    img = nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec"); img.header["pixdim"][4] = 1.5
    return img


def test_shared_mask_keeps_every_voxel_of_zscored_input(tmp_path, caplog):
    paths = [write(zscored_runs(s), tmp_path / f"z{s}.nii.gz") for s in range(3)]
    brain = np.zeros((8, 7, 6), bool); brain[1:-1, 1:-1, 1:-1] = True       # 120 voxels
    with caplog.at_level(logging.INFO, LOG):
        mask = shared_mask(paths)
    np.testing.assert_array_equal(np.asarray(mask.dataobj) > 0, brain)
    assert "looks standardised" in caplog.text
    assert f"shared mask: 120 of {brain.size} voxels kept from 3 subjects" in caplog.text
    assert f"{brain.size - 120} constant in 2 or more of the 3 subjects" in caplog.text
    # the rule for raw data would drop real voxels here: about 10% per subject, by rounding
    forced = np.asarray(shared_mask(paths, threshold=1.0, standardised=False).dataobj) > 0
    assert forced.sum() < 120 * 0.95 and not (forced & ~brain).any()
    # raw data with varied stds is not mistaken for standardised input
    raw = nib.Nifti1Image(np.asarray(zscored_runs(0).dataobj) * np.random.default_rng(5).uniform(5, 50, (8, 7, 6, 1))
                          .astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    caplog.clear()
    with caplog.at_level(logging.INFO, LOG):
        assert np.asarray(shared_mask([raw]).dataobj).sum() == 120 - 12    # the 10th-percentile rule
    assert "standardised" not in caplog.text


def test_shared_mask_from_a_mask_file_an_atlas_or_nonzero(tmp_path, caplog):
    paths = [write(zscored_runs(s), tmp_path / f"z{s}.nii.gz") for s in range(2)]
    atlas = np.zeros((8, 7, 6), np.int16); atlas[2:5, 2:5, 2:4] = np.arange(1, 19).reshape(3, 3, 2)
    atlas[0, 0, 0] = 7                                                    # a label outside the data: constant, dropped
    atlas_path = write(nib.Nifti1Image(atlas, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "atlas.nii.gz")
    with caplog.at_level(logging.INFO, LOG):
        m = np.asarray(shared_mask(paths, brain_mask=atlas_path).dataobj) > 0
    np.testing.assert_array_equal(m, (atlas > 0) & (np.arange(8)[:, None, None] > 0))
    assert f"removed: {atlas.size - 19} outside the mask {atlas_path}, 0 NaN or infinite, 1 constant" in caplog.text
    nonzero = np.asarray(shared_mask(paths, brain_mask="nonzero").dataobj) > 0
    assert nonzero.sum() == 120
    with pytest.raises(ValueError, match="does not match the mask"):
        shared_mask(paths, brain_mask=np.ones((8, 7, 5), bool))


# --- each scan read once ----------------------------------------------------------------------------------------


def awkward_scan(seed, late=True, n_trs=40):
    "A scaled int16 scan with a voxel that is 0 in the first volumes and varies later, and one that is 0 at a used volume."
    img = scan(n_trs=n_trs, seed=seed, slope=0.5, inter=3.0)
    raw = np.asarray(img.dataobj).astype(np.float64)            # the scaled values
    raw[0, 0, 0, 10:] = np.random.default_rng(seed).normal(500, 40, n_trs - 10) if late else 0   # outside the box: 0 early
    raw[2, 2, 2, 12] = 0.0                                                              # 0 at one used volume
    out = nib.Nifti1Image(np.round((raw - 3.0) / 0.5).astype(np.int16), img.affine, img.header)
    out.header.set_slope_inter(0.5, 3.0)
    return out


def counting_reads(monkeypatch):
    reads, real = [], fmri.iter_volumes
    def iter_volumes(img, *a, **k):
        reads.append(fmri._name(img)); return real(img, *a, **k)
    monkeypatch.setattr(fmri, "iter_volumes", iter_volumes)
    monkeypatch.setattr(fmri, "nii_to_features", lambda *a, **k: pytest.fail("a scan was read a second time"))
    return reads


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_one_pass_reads_each_scan_once_and_equals_shared_mask_then_reading(tmp_path, monkeypatch, threshold):
    paths = [write(awkward_scan(s, late=s != 2), tmp_path / f"s{s}.nii.gz") for s in range(3)]
    parts = [(paths[:2], 5, 25), (paths[:2], 12, 40)]     # a scan used twice, one used only by the mask
    reads = counting_reads(monkeypatch)
    with OnePassBold(parts, MaskRule(paths, threshold=threshold), workdir=tmp_path / "work") as once:
        copies = sorted(p.name for p in (tmp_path / "work").iterdir())
        assert len(copies) == 4 and all(c.startswith(".bold-") for c in copies)   # a dense and a sparse file per used scan
        monkeypatch.undo()
        assert sorted(reads) == sorted(map(str, paths))                      # one decompression per scan
        ref_mask = shared_mask(paths, threshold=threshold)
        m = np.asarray(ref_mask.dataobj)
        assert m[0, 0, 0] == (threshold < 1)           # the late voxel (0 in volume 5 of both used scans) is in the mask
        np.testing.assert_array_equal(np.asarray(once.mask.dataobj), m)
        np.testing.assert_array_equal(once[1], SubjectBold(parts, ref_mask)[1])      # bit-identical
        np.testing.assert_array_equal(np.asarray(once), np.asarray(SubjectBold(parts, ref_mask)))
    assert list((tmp_path / "work").iterdir()) == []                          # close removes the copies


def test_one_pass_errors_leave_no_copies(tmp_path):
    good = write(scan(shape=(16, 16, 16), n_trs=20), tmp_path / "good.nii.gz")
    raw = bytearray(good.read_bytes()); raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    bad = tmp_path / "damaged.nii.gz"; bad.write_bytes(bytes(raw))
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"damaged\.nii\.gz: .*corrupt"):
        OnePassBold([([good, bad], 0, 20)], MaskRule([good, bad]), workdir=work)
    assert list(work.iterdir()) == []
    nan = scan(shape=(16, 16, 16), n_trs=20, dtype=np.float32); d = np.asarray(nan.dataobj).copy(); d[5, 5, 5, 3] = np.nan
    odd = write(nib.Nifti1Image(d, nan.affine, nan.header), tmp_path / "nan.nii.gz")
    with OnePassBold([([odd], 0, 20)], MaskRule([good]), workdir=work) as once:      # a scan the rule did not see
        with pytest.raises(ValueError, match=r"nan\.nii\.gz: in-mask voxels are NaN"): once[0]
    with pytest.raises(ValueError, match="threshold must be in"): OnePassBold([([good], 0, 20)], MaskRule([good], threshold=0))


def test_one_pass_reads_a_copy_whose_columns_are_the_mask_straight_in(tmp_path, monkeypatch):
    paths = [write(scan(seed=s), tmp_path / f"s{s}.nii.gz") for s in range(2)]
    rule = MaskRule(paths, brain_mask="nonzero")          # every non-zero, non-constant voxel: the copy's own columns
    with OnePassBold([(paths, 3, 30)], rule, workdir=tmp_path / "w") as once:
        assert once.shape[2] == (6 - 2) * (5 - 2) * (4 - 2) and all(c.cols.size == once.shape[2] for c in once.copies.values())
        monkeypatch.setattr(np, "fromfile", lambda *a, **k: pytest.fail("gathered column by column"))
        got = np.asarray(once)
        monkeypatch.undo()
        np.testing.assert_array_equal(got, np.asarray(SubjectBold([(paths, 3, 30)], shared_mask(paths, brain_mask="nonzero"))))
