"""Timing end to end: a flash lands in the TR that holds it, its HRF response peaks 4.5-6.5 s later, and streams of
different lengths are truncated to the shorter, never stretched."""
import numpy as np
import nibabel as nib
import pandas as pd
import pytest

from giblet.alignment.hrf import convolve_hrf
from giblet.alignment.sync import FeatureParams, RunSpec, align_run, concat_runs
from giblet.dataset import block_split, context_starts, fit_normaliser
from giblet.data.fmri import nii_to_features
from giblet.data.video import frames_to_video, video_to_frames

TR, FPS, FLASH = 1.5, 25, 10.2      # the flash: film time 10.2-10.4 s, inside TR 6 = [9.0, 10.5)
PARAMS = FeatureParams(size=(32, 18), frame_skip=1, n_mels=16, text_dim=64)


def write_film(path, seconds):
    n = int(seconds * FPS)
    t = np.arange(n) / FPS
    frames = np.full((n, 18, 32, 3), 20, np.uint8)
    frames[(t >= FLASH) & (t < FLASH + 0.2)] = 255
    sr = 16000
    ts = np.arange(int(seconds * sr)) / sr
    audio = (0.2 * np.sin(2 * np.pi * 440 * ts)).astype(np.float32)
    return frames_to_video(frames, path, FPS, audio=audio, sample_rate=sr)


def write_scan(path, n_volumes, seed=0):
    data = np.random.default_rng(seed).normal(1000, 10, (4, 3, 2, n_volumes)).astype(np.int16)
    img = nib.Nifti1Image(data, np.eye(4)); img.header.set_xyzt_units("mm", "sec"); img.header["pixdim"][4] = TR
    nib.save(img, path)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    d = tmp_path_factory.mktemp("study")
    film = write_film(d / "film.mp4", 30.0)
    pd.DataFrame({"Start Time (s) ": [0.0, 12.0], "End Time (s) ": [6.0, 20.0],
                  "Scene Details - A Level ": ["a dark room", "a bright street"], "Name - All": ["Sherlock", "John"],
                  "Location": ["flat", "London"]}).to_csv(d / "ann.csv", index=False)
    mask = nib.Nifti1Image(np.ones((4, 3, 2), np.uint8), np.eye(4))
    return d, film, d / "ann.csv", mask


def test_flash_lands_in_its_tr_and_the_hrf_peaks_later(study):
    d, film, ann, mask = study
    al = align_run(film, ann, RunSpec([write_scan(d / "s1.nii.gz", 40)]), mask, params=PARAMS)
    brightness = al.video.astype(np.float32).mean(axis=(1, 2, 3, 4))
    flash_tr = int(FLASH // TR)
    assert np.argmax(brightness) == flash_tr
    assert brightness[flash_tr] > brightness[flash_tr - 1] + 10 and np.allclose(np.delete(brightness, flash_tr), 20, atol=3)
    bold = convolve_hrf(brightness - brightness.min(), TR)
    lag = al.tr_start[np.argmax(bold)] - al.tr_start[flash_tr]
    assert 4.5 <= lag <= 6.5, lag
    assert np.all(bold[:flash_tr] == 0)


def test_film_longer_than_scan_truncates_to_the_scan(study):
    d, film, ann, mask = study
    scan = write_scan(d / "short.nii.gz", 12)                  # 18 s of scan, 30 s of film
    al = align_run(film, ann, RunSpec([scan]), mask, params=PARAMS)
    assert al.n_trs == 12 and al.video.shape[0] == al.audio.shape[0] == al.text.shape[0] == 12
    # nothing stretched: TR i holds the film's own frames of [i*TR, (i+1)*TR) and the scan's volume i
    np.testing.assert_array_equal(al.video, video_to_frames(film, tr=TR, size=(32, 18), frame_skip=1, max_trs=12))
    np.testing.assert_array_equal(al.fmri[0], nii_to_features(scan, mask))


def test_scan_longer_than_film_truncates_to_the_film(study):
    d, film, ann, mask = study
    scan = write_scan(d / "long.nii.gz", 30)                   # 45 s of scan, 30 s of film
    al = align_run(film, ann, RunSpec([scan]), mask, params=PARAMS)
    assert al.n_trs == 20                                       # floor(30 / 1.5): only whole windows of film
    np.testing.assert_array_equal(al.fmri[0], nii_to_features(scan, mask)[:20])
    np.testing.assert_allclose(al.tr_start, np.arange(20) * TR)


def test_scan_offset_drops_volumes_before_the_film(study):
    d, film, ann, mask = study
    scan = write_scan(d / "off.nii.gz", 20)
    al = align_run(film, ann, RunSpec([scan], scan_offset=3.0), mask, params=PARAMS)
    assert al.volume[0] == 2 and al.tr_start[0] == 0.0
    np.testing.assert_array_equal(al.fmri[0], nii_to_features(scan, mask)[2:2 + al.n_trs])


def test_tr_asked_for_must_match_the_header(study):
    d, film, ann, mask = study
    with pytest.raises(ValueError, match="header says TR = 1.5"):
        align_run(film, ann, RunSpec([write_scan(d / "t.nii.gz", 10)]), mask, tr=2.0, params=PARAMS)


def test_runs_keep_their_ids_and_windows_never_cross_them(study):
    d, film, ann, mask = study
    a = align_run(film, ann, RunSpec([write_scan(d / "r0.nii.gz", 10)]), mask, params=PARAMS, run_id=0)
    b = align_run(film, ann, RunSpec([write_scan(d / "r1.nii.gz", 10)], film_start=15.0), mask, params=PARAMS, run_id=1)
    al = concat_runs([a, b])
    assert al.n_trs == 20 and list(np.unique(al.run)) == [0, 1]
    starts = context_starts(np.arange(20), al.run, 4)
    assert all(al.run[s] == al.run[s + 3] for s in starts) and len(starts) == 2 * 7


def test_splits_have_the_gap_and_statistics_come_from_training_only():
    rng = np.random.default_rng(1)
    fmri, audio = rng.normal(1000, 5, (3, 400, 20)).astype(np.float32), rng.normal(size=(400, 8, 4)).astype(np.float32)
    sp = block_split(400, TR, val_frac=0.2, test_frac=0.1, gap=20.0)
    assert not set(sp.train) & set(sp.val) and not set(sp.val) & set(sp.test)
    assert (sp.val.min() - sp.train.max()) * TR > 20 and (sp.test.min() - sp.val.max()) * TR > 20
    nz = fit_normaliser(fmri, audio, sp.train)
    np.testing.assert_allclose(nz.fmri_mean, fmri[:, sp.train].mean(1), rtol=1e-6)
    np.testing.assert_allclose(nz.fmri_std, fmri[:, sp.train].std(1), rtol=1e-4)
    np.testing.assert_allclose(nz.audio_mean, audio[sp.train].mean((0, 2)), rtol=1e-4, atol=1e-6)
    fmri[:, sp.val] += 1e4; audio[sp.test] -= 50                 # held-out data cannot move the statistics
    nz2 = fit_normaliser(fmri, audio, sp.train)
    np.testing.assert_array_equal(nz2.fmri_mean, nz.fmri_mean)
    np.testing.assert_array_equal(nz2.audio_std, nz.audio_std)


# --- truncations are warned with counts; film time at volume 0 of either sign; annotation parts per run -----------

def test_short_subject_is_warned_or_dropped(study, caplog):
    d, film, ann, mask = study
    full, short = write_scan(d / "full.nii.gz", 20, seed=1), write_scan(d / "cut.nii.gz", 16, seed=2)
    with caplog.at_level("WARNING", logger="giblet.alignment.sync"):
        al = align_run(film, ann, RunSpec([full, short]), mask, params=PARAMS)
    assert al.fmri.shape[:2] == (2, 16) and al.subjects is None
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert f"every subject is cut to 16 TRs by the shortest: {short} (16 volumes, 16 TRs)" in msg, msg
    assert "lose up to 4 TRs" in msg and "min_trs=20" in msg, msg
    caplog.clear()
    with caplog.at_level("WARNING", logger="giblet.alignment.sync"):
        al = align_run(film, ann, RunSpec([full, short]), mask, params=PARAMS, min_trs=20)
    assert al.fmri.shape[:2] == (1, 20) and al.subjects == [0]
    np.testing.assert_array_equal(al.fmri[0], nii_to_features(full, mask))
    assert f"subject {short} dropped: its 16 volumes give 16 TRs, fewer than min_trs=20" in caplog.text
    with pytest.raises(ValueError, match="different subjects"):
        concat_runs([al, align_run(film, ann, RunSpec([full, short]), mask, params=PARAMS, run_id=1)])


def test_scan_and_film_cuts_are_warned(study, caplog):
    d, film, ann, mask = study
    with caplog.at_level("WARNING", logger="giblet.alignment.sync"):
        align_run(film, ann, RunSpec([write_scan(d / "long.nii.gz", 30)]), mask, params=PARAMS)
    assert "the scan's last 10 volumes (15.0 s) lie past the film segment's end" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="giblet.alignment.sync"):
        align_run(film, ann, RunSpec([write_scan(d / "short.nii.gz", 12)]), mask, params=PARAMS)
    assert "the film segment's last 12.0 s (8 TRs) lie past the scan's end" in caplog.text


@pytest.mark.parametrize("film_at_volume0", [3.0, -3.0])
def test_film_time_at_volume_zero_of_either_sign(study, film_at_volume0):
    d, film, ann, mask = study
    scan = write_scan(d / "v0.nii.gz", 20)
    al = align_run(film, ann, RunSpec([scan], film_start=film_at_volume0), mask, params=PARAMS)
    first = 2 if film_at_volume0 < 0 else 0          # the film begins 3 s (2 volumes) after volume 0: those go
    assert al.volume[0] == first
    np.testing.assert_array_equal(al.fmri[0], nii_to_features(scan, mask)[first:first + al.n_trs])
    film_time = film_at_volume0 + al.volume * TR      # the film time of each kept volume
    assert film_time[0] >= 0
    flash = int(np.argmax(al.video.astype(np.float32).mean(axis=(1, 2, 3, 4))))
    assert film_time[flash] <= FLASH < film_time[flash] + TR   # the flash lands in the volume that saw it
    assert al.n_trs == (20 - first if film_at_volume0 < 0 else int((30.0 - film_at_volume0) // TR))


def test_each_run_gets_its_own_annotation_part(study, caplog):
    d, film, _, mask = study
    ann = d / "parts.csv"                             # two parts on one sheet: the clock restarts, the TR count runs on
    pd.DataFrame({"Start Time (s) ": [0.0, 12.0, 0.0, 12.0], "End Time (s) ": [12.0, 30.0, 12.0, 30.0],
                  "Start Time (TRs, 1.5s)": [1, 9, 21, 29], "Scene Details - A Level ": ["p1 a", "p1 b", "p2 a", "p2 b"],
                  }).to_csv(ann, index=False)
    scan = write_scan(d / "p.nii.gz", 20)
    with caplog.at_level("INFO", logger="giblet.alignment.sync"):
        a = align_run(film, ann, RunSpec([scan]), mask, params=PARAMS, run_id=0)
        b = align_run(film, ann, RunSpec([scan]), mask, params=PARAMS, run_id=1)
    assert "run 0 shows annotation part 1 of 2" in caplog.text and "run 1 shows annotation part 2 of 2" in caplog.text
    assert set(a.texts) == {"p1 a", "p1 b"} and set(b.texts) == {"p2 a", "p2 b"}
    c = align_run(film, ann, RunSpec([scan], part=2), mask, params=PARAMS, run_id=0)
    assert c.texts == b.texts
    with pytest.raises(ValueError, match="no annotation part of its own"):
        align_run(film, ann, RunSpec([scan]), mask, params=PARAMS, run_id=2)


def test_a_film_holding_both_parts_puts_each_part_on_its_segment(study):
    d, film, _, mask = study
    ann = d / "parts_one_film.csv"                    # film 0-15 s is part 1, 15-30 s is part 2 (clock back at 0)
    pd.DataFrame({"Start Time (s) ": [0.0, 6.0, 0.0, 6.0], "End Time (s) ": [6.0, 15.0, 6.0, 15.0],
                  "Start Time (TRs, 1.5s)": [1, 5, 11, 15], "Scene Details - A Level ": ["p1 a", "p1 b", "p2 a", "p2 b"],
                  }).to_csv(ann, index=False)
    scan = write_scan(d / "q.nii.gz", 10)
    b = align_run(film, ann, RunSpec([scan], film_start=15.0), mask, params=PARAMS, run_id=1)
    assert b.texts == ["p2 a"] * 4 + ["p2 b"] * 6           # part 2's own clock starts with its segment at 15 s
    # a release with its first 3 s of volumes cropped: volume 0 is 3 s into part 2, whose clock stays put
    c = align_run(film, ann, RunSpec([scan], film_start=15.0, scan_offset=-3.0), mask, params=PARAMS, run_id=1)
    assert c.texts == ["p2 a"] * 2 + ["p2 b"] * 6 and c.volume[0] == 0


def test_streamed_bold_reads_subjects_on_demand_and_equals_the_array(study):
    from giblet.data.subjects import SubjectBold
    d, film, ann, mask = study
    scans = [[write_scan(d / f"st{r}_{s}.nii.gz", 12 + s, seed=10 * r + s) for s in range(2)] for r in range(2)]
    spec = lambda r: RunSpec(scans[r], film_start=15.0 * r)
    eager = [align_run(film, ann, spec(r), mask, params=PARAMS, run_id=r) for r in range(2)]
    lazy = [align_run(film, ann, spec(r), mask, params=PARAMS, run_id=r, stream_fmri=True) for r in range(2)]
    assert isinstance(lazy[0].fmri, SubjectBold) and lazy[0].fmri.shape == eager[0].fmri.shape
    np.testing.assert_array_equal(lazy[1].fmri[1], eager[1].fmri[1])
    both, whole = concat_runs(lazy), concat_runs(eager)
    assert isinstance(both.fmri, SubjectBold) and both.n_trs == whole.n_trs == 12 + 10
    np.testing.assert_array_equal(np.asarray(both.fmri), whole.fmri)
    np.testing.assert_array_equal(both.video, whole.video)


def test_a_plan_decodes_nothing_and_each_stream_is_cut_on_its_grid(study, monkeypatch, caplog):
    import giblet.alignment.sync as sync
    from giblet.alignment.sync import complete_trs, plan_run, run_audio, run_text, run_video
    d, film, ann, mask = study
    spec = RunSpec([write_scan(d / "p1.nii.gz", 30), write_scan(d / "p2.nii.gz", 30, seed=1)], film_start=1.5, scan_offset=3.0)
    with monkeypatch.context() as m:                       # the grid comes from the headers and the film's length alone
        m.setattr(sync, "video_to_frames", lambda *a, **k: pytest.fail("a plan decoded frames"))
        m.setattr(sync, "audio_to_mel", lambda *a, **k: pytest.fail("a plan decoded sound"))
        m.setattr(sync, "load_subjects", lambda *a, **k: pytest.fail("a plan read BOLD"))
        plan = plan_run(film, ann, spec, run_id=1)
    g = plan.grid
    assert (g.first_volume, g.tr, plan.part, plan.subjects) == (2, TR, 1, None) and plan.grid_key()["film_time"] == g.film_time
    video, audio, (text, has_text, texts) = run_video(plan, PARAMS), run_audio(plan, PARAMS), run_text(plan, PARAMS)
    assert len(video) <= g.n_trs and len(audio) <= g.n_trs and len(text) == len(has_text) == len(texts) == g.n_trs
    n = complete_trs(plan, len(video), len(audio))
    al = align_run(film, ann, spec, mask, params=PARAMS, run_id=1)       # the pieces make align_run
    assert al.n_trs == n and (al.run == 1).all()
    np.testing.assert_array_equal(al.video, video[:n]); np.testing.assert_array_equal(al.audio, audio[:n])
    np.testing.assert_array_equal(al.text, text[:n]); assert al.texts == texts[:n]
    with caplog.at_level("WARNING"): assert complete_trs(plan, n - 2, n) == n - 2     # a stream ending early cuts the run
    assert f"only {n - 2} of {g.n_trs} TR windows are complete in every stream" in caplog.text
