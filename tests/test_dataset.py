"""load_study end to end on the synthetic study: discovery, a cache that is reused, and rebuilt when stale or damaged."""
import os
import shutil

import numpy as np
import pytest

from giblet.alignment.sync import FeatureParams
from giblet.data.dataset import discover, load_arrays, load_study
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
