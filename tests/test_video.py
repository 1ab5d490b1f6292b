"""End-to-end tests of giblet.data.video on films written to disk: round trips, odd and variable frame rates,
timestamp-exact window assignment, seeking, resizing, audio muxing and bad inputs."""
import logging
import math
import os
import stat
from fractions import Fraction

import av
import numpy as np
import pytest

from giblet.data.video import (VideoInfo, _moving_pattern, frames_per_tr, frames_to_video, psnr, video_info,
                               video_to_frames)

# Frames that carry their own index k in base 16: red codes k % 16, green (k // 16) % 16, blue k // 256, in steps
# of 14 levels (robust to coding).
def index_frames(n, size=(32, 18)):
    w, h = size
    k = np.arange(n)
    rgb = (16 + 14 * np.stack([k % 16, (k // 16) % 16, k // 256], -1)).astype(np.uint8)
    return np.broadcast_to(rgb[:, None, None, :], (n, h, w, 3)).copy()

def read_index(frames):
    "Frame index coded in each frame of `frames` (..., H, W, 3)."
    digits = np.rint((frames.astype(np.float64).mean(axis=(-3, -2)) - 16) / 14).astype(int)
    return digits[..., 0] + 16 * digits[..., 1] + 256 * digits[..., 2]

def check_windows(idx, times, tr, start=0.0):
    "Every sample's source frame has its timestamp inside the sample's TR window; samples never go back in time."
    for i, row in enumerate(idx):
        t = times[row]
        assert np.all(t >= start + i * tr - 1e-9) and np.all(t < start + (i + 1) * tr - 1e-9), (i, row, t)
        assert np.all(np.diff(row) >= 0), (i, row)


@pytest.fixture(scope="module")
def film(tmp_path_factory):
    "16 s of moving structure at 25 fps, 160x90, with a mono 440 Hz tone; returns (path, frames, waveform)."
    frames = _moving_pattern(400)
    sr = 16000
    wave = (0.4 * np.sin(2 * np.pi * 440 * np.arange(16 * sr) / sr)).astype(np.float32)
    path = frames_to_video(frames, tmp_path_factory.mktemp("film") / "film.m4v", fps=25, audio=wave, sample_rate=sr)
    return path, frames, wave


def test_round_trip_psnr(film):
    path, frames, _ = film
    back = video_to_frames(path, frame_skip=1)                 # 38 samples per TR; a 37-frame window repeats one
    assert back.shape == (10, 38, 90, 160, 3) and back.dtype == np.uint8
    starts = [math.ceil(i * 37.5) for i in range(10)]
    orig = np.stack([frames[s:s + 37] for s in starts])
    score = psnr(orig, back[:, :37])
    print(f"round-trip PSNR at 160x90: {score:.2f} dB")
    assert score >= 30
    # windows of 37 frames (odd i) repeat their last frame; windows of 38 frames do not
    assert np.array_equal(back[1, 37], back[1, 36]) and psnr(back[0, 37], back[0, 36]) < 60


def test_info(film):
    path, frames, wave = film
    info = video_info(path)
    assert isinstance(info, VideoInfo)
    assert (info.fps, info.n_frames, info.width, info.height, info.has_audio) == (25.0, 400, 160, 90, True)
    assert info["duration"] == pytest.approx(16.0) and info.codec == "h264"
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        assert (a.codec_context.name, a.rate, a.channels) == ("aac", 16000, 1)
        n = sum(f.samples for f in c.decode(a))
        assert abs(n - wave.size) <= 2048                     # AAC frames are 1024 samples


def test_default_sampling_and_prefixes(film):
    path, _, _ = film
    full = video_to_frames(path)
    assert full.shape == (10, frames_per_tr(25), 90, 160, 3) == (10, 19, 90, 160, 3)
    np.testing.assert_array_equal(video_to_frames(path, max_trs=3), full[:3])
    # start at 10.5 s: one seek (to the keyframe at 10 s), then the same pixels as windows 7.. of the full decode
    np.testing.assert_array_equal(video_to_frames(path, start=10.5), full[7:])
    assert video_to_frames(path, start=0.75).shape == (10, 19, 90, 160, 3)   # (16 - 0.75) / 1.5 = 10.2


def test_resize(film):
    path, frames, _ = film
    small = video_to_frames(path, size=(80, 45), frame_skip=1, max_trs=2)
    assert small.shape == (2, 38, 45, 80, 3)
    ref = frames[:38].reshape(38, 45, 2, 80, 2, 3).astype(np.float64).mean((2, 4)).round().astype(np.uint8)
    assert psnr(ref, small[0]) >= 30


def test_odd_fps_timestamps_and_flash(tmp_path):
    # 23.976 fps: a TR holds 35.964 frames. Counting 36 frames per TR drifts by a frame after 28 TRs; timestamps do not.
    rate = Fraction(24000, 1001)
    n, flash = 1100, 1007                      # frame 1007 starts TR 28 by timestamp (counting would say TR 27)
    frames = index_frames(n)
    frames[flash] = 255
    path = frames_to_video(frames, tmp_path / "ntsc.mp4", fps=24000 / 1001)
    assert video_info(path).fps == pytest.approx(24000 / 1001)
    times = np.arange(n) * 1001 / 24000
    assert int(times[flash] // 1.5) == 28 and flash // 36 == 27
    for skip in (1, 2):
        v = video_to_frames(path, size=(32, 18), frame_skip=skip)
        assert v.shape == (30, math.ceil(rate * Fraction(3, 2) / skip), 18, 32, 3)   # 45.9 s: 30 complete TRs
        bright = np.argwhere(v.mean(axis=(2, 3, 4)) > 240).tolist()
        assert bright == [[28, 0]]                            # the flash is sample 0 of TR 28, nowhere else
        idx = read_index(v)
        idx[28, 0] = flash
        check_windows(idx, times, 1.5)
        for i, row in enumerate(idx):                         # every `skip`-th frame from the window's first frame
            first, end = (math.ceil(k * Fraction(36000, 1001)) for k in (i, i + 1))
            sampled = list(range(first, end, skip))
            np.testing.assert_array_equal(row, sampled + sampled[-1:] * (len(row) - len(sampled)))


def test_short_window_repeats_last_sample(tmp_path):
    # 29.97 fps, TR 0 from 1.0014 s: window 0 holds frames 31..74 (44 frames) but frames_per_tr is 23
    path = frames_to_video(index_frames(200), tmp_path / "ntsc30.mp4", fps=30000 / 1001)
    v = video_to_frames(path, size=(32, 18), start=1.0014)
    assert v.shape == (3, 23, 18, 32, 3)
    idx = read_index(v)
    assert idx[0].tolist() == list(range(31, 75, 2)) + [73]   # the 23rd sample repeats the 22nd
    assert idx[1].tolist() == list(range(75, 120, 2))         # a 45-frame window fills all 23
    check_windows(idx, np.arange(200) * 1001 / 30000, 1.5, start=1.0014)


@pytest.mark.parametrize("fmt", ["matroska", "mpegts"])
def test_rounded_and_offset_timestamps(tmp_path, fmt):
    # Matroska rounds timestamps to ms (33, 67, 100, ...); MPEG-TS starts its clock at 1/15 s, not 0
    frames = index_frames(300)
    path = tmp_path / f"film.{fmt}"
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream("libx264", rate=Fraction(30000, 1001))
        vs.width, vs.height, vs.pix_fmt = 32, 18, "yuv420p"
        for k, img in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts = k
            out.mux(vs.encode(vf))
        out.mux(vs.encode())
    info = video_info(path)
    assert (info.n_frames, info.fps) == (300, pytest.approx(30000 / 1001))
    idx = read_index(video_to_frames(path, size=(32, 18)))
    assert idx.shape == (6, 23)                                # 10.01 s: 6 complete TRs
    check_windows(idx, np.arange(300) * 1001 / 30000, 1.5)
    for i, row in enumerate(idx):                              # every second frame from the window's first
        first = math.ceil(i * Fraction(45000, 1001))
        assert row.tolist() == list(range(first, first + 46, 2))[:23]


def test_variable_frame_rate(tmp_path):
    # 6 s at 25 fps, then 6 s at 5 fps; timestamps in ms. The average rate (about 15 fps) sets frames_per_tr = 12.
    times_ms = [40 * k for k in range(150)] + [6000 + 200 * k for k in range(30)]
    frames = index_frames(len(times_ms))
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 32, 18, "yuv420p"
        vs.codec_context.time_base = Fraction(1, 1000)
        for img, t in zip(frames, times_ms):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = t, Fraction(1, 1000)
            out.mux(vs.encode(vf))
        out.mux(vs.encode())
    assert 14 < video_info(path).fps < 16 and frames_per_tr(video_info(path).fps) == 12   # container-dependent
    v = video_to_frames(path, size=(32, 18))
    assert v.shape == (7, 12, 18, 32, 3)                       # the film ends at about 12 s: 7 complete TRs
    idx = read_index(v)
    times = np.array(times_ms) / 1000
    check_windows(idx, times, 1.5)
    for i, row in enumerate(idx):                              # samples are spread over the whole window
        assert times[row[0]] < i * 1.5 + 0.2 and times[row[-1]] > (i + 1) * 1.5 - 0.4
    assert len(np.unique(idx[1])) >= 11                        # 25 fps part: distinct frames
    in_window = np.flatnonzero((times >= 7.5) & (times < 9.0))  # 5 fps part: 7 frames for 12 samples,
    assert sorted(set(idx[5])) == in_window.tolist()           # each used, some twice


def test_frames_to_video_shapes_odd_size_and_iterables(tmp_path):
    frames = _moving_pattern(30, size=(161, 91))
    path = frames_to_video(iter(frames), tmp_path / "odd.mp4", fps=25)
    info = video_info(path)
    assert (info.width, info.height, info.n_frames, info.has_audio) == (162, 92, 30, False)
    back = video_to_frames(path, size=(162, 92), frame_skip=1, tr=1.0)[0, :25, :91, :161]
    assert psnr(frames[:25], back) >= 30
    # (n_trs, frames_per_tr, H, W, 3) is written in time order, with stereo audio
    tr_frames = _moving_pattern(40).reshape(2, 20, 90, 160, 3)
    stereo = np.zeros((2, 8000 * 2), np.float32)
    p2 = frames_to_video(tr_frames, tmp_path / "trs.mp4", fps=Fraction(20), audio=stereo, sample_rate=8000)
    info = video_info(p2)
    assert (info.n_frames, info.has_audio, info.fps) == (40, True, 20.0)
    assert psnr(video_to_frames(p2, tr=1.0, frame_skip=1), tr_frames) >= 30


def test_atomic_write(tmp_path):
    path = frames_to_video(index_frames(10), tmp_path / "keep.mp4", fps=10)
    before = path.read_bytes()
    def frames():
        yield from index_frames(5)
        yield np.zeros((18, 32, 3), np.float32)           # a bad frame half way
    with pytest.raises(ValueError, match="keep.mp4.*float32"):
        frames_to_video(frames(), path, fps=10)
    assert path.read_bytes() == before                    # the old film is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]   # and no temporary file is left
    umask = os.umask(0); os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask    # ordinary permissions, like any new file


def test_bad_inputs(tmp_path, film):
    path = film[0]
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        video_to_frames(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        video_info(tmp_path / "missing.mp4")
    text = tmp_path / "notes.txt"
    text.write_text("this is not a film\n" * 100)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 10000, dtype=np.uint8).tobytes())
    for bad in (text, junk):
        with pytest.raises(ValueError, match=bad.name):
            video_to_frames(bad)
    wav = tmp_path / "sound.wav"                          # audio only: no video stream
    with av.open(str(wav), "w") as out:
        st = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        af = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        af.sample_rate = 8000
        out.mux(st.encode(af)); out.mux(st.encode())
    with pytest.raises(ValueError, match="sound.wav.*video stream"):
        video_info(wav)
    with pytest.raises(ValueError, match="10 complete TR windows"):
        video_to_frames(path, max_trs=11)
    with pytest.raises(ValueError, match="0 complete TR windows"):
        video_to_frames(path, start=100)
    for kw, msg in [(dict(size=(160,)), "size"), (dict(size=(0, 90)), "size"), (dict(tr=0), "tr"),
                    (dict(frame_skip=0), "frame_skip"), (dict(frame_skip=1.5), "frame_skip"), (dict(max_trs=0), "max_trs"),
                    (dict(start=-1), "start")]:
        with pytest.raises(ValueError, match=msg):
            video_to_frames(path, **kw)
    out = tmp_path / "x.mp4"
    good = index_frames(4)
    for frames, msg in [(good.astype(np.float32), "dtype float32"), (good[..., :2], "shape"), (good[0], "shape"),
                        (good[:0], "shape"), ([], "no frames"), (5, "int")]:
        with pytest.raises(ValueError, match=msg):
            frames_to_video(frames, out, fps=25)
    for audio, sr, msg in [(np.zeros(100, np.int16), 16000, "float"), (np.zeros((100, 2), np.float32), 16000, "shape"),
                           (np.zeros(100, np.float32), None, "sample_rate"), (np.zeros(100, np.float32), 12345, "sample_rate"),
                           (np.full(100, 1.5, np.float32), 16000, r"\[-1, 1\]"), (np.full(100, np.nan, np.float32), 16000, "finite")]:
        with pytest.raises(ValueError, match=msg):
            frames_to_video(good, out, fps=25, audio=audio, sample_rate=sr)
    with pytest.raises(ValueError, match="fps"):
        frames_to_video(good, out, fps=0)
    with pytest.raises(ValueError, match="crf"):
        frames_to_video(good, out, fps=25, crf=60)
    assert not out.exists()


# --- rotation, aspect and corrupt films ---------------------------------------------------------------------------

def quadrants(n=40, size=(64, 36)):
    "Frames of three coloured quadrants on grey: any turn or flip shows."
    w, h = size
    f = np.full((n, h, w, 3), 40, np.uint8)
    f[:, :h // 2, :w // 2] = (220, 60, 40); f[:, :h // 2, w // 2:] = (40, 200, 60); f[:, h // 2:, :w // 2] = (50, 60, 210)
    return f


def write_turned(upright, path, degrees):
    "Store frames turned by -degrees (as a camera held sideways does) with a display matrix turning them by `degrees`."
    stored = np.ascontiguousarray(np.rot90(upright, -round(degrees / 90), axes=(1, 2)))
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25, options={"crf": "12"})
        vs.width, vs.height, vs.pix_fmt = stored.shape[2], stored.shape[1], "yuv420p"
        vs.set_display_rotation(degrees)
        for k, img in enumerate(stored):
            vf = av.VideoFrame.from_ndarray(img, format="rgb24"); vf.pts = k; out.mux(vs.encode(vf))
        out.mux(vs.encode())
    return path


@pytest.mark.parametrize("degrees", [-90, 90, 180])
def test_rotated_clip_reads_upright(tmp_path, degrees):
    up = quadrants()
    path = write_turned(up, tmp_path / f"turned{degrees}.mp4", degrees)
    with av.open(str(path)) as c:                                   # the file really is stored turned
        frame = next(c.decode(video=0))
        assert frame.rotation % 360 == degrees % 360 and (frame.width, frame.height) == ((36, 64) if degrees % 180 else (64, 36))
    info = video_info(path)
    assert (info.width, info.height, info.rotation) == (64, 36, degrees % 360)   # the upright picture
    got = video_to_frames(path, size=(64, 36), frame_skip=1, max_trs=1)[0, :30]
    scores = {k: psnr(got, np.rot90(up[:30], k, axes=(1, 2))) for k in (0, 2)}
    scores.update({k: psnr(got, np.rot90(up, k, axes=(1, 2))[:, 14:50:1, :][:, :, :64] if False else got * 0) for k in ()})
    assert scores[0] > 25 and scores[2] < 12, scores               # upright, not upside down
    flipped = psnr(got, up[:30, ::-1])
    assert flipped < 15, flipped


@pytest.mark.parametrize("film_size, out, rows, cols", [((64, 48), (64, 36), slice(6, 42), slice(0, 64)),    # 4:3 -> 16:9
                                                       ((96, 36), (64, 36), slice(0, 36), slice(16, 80))])  # 8:3 -> 16:9
def test_other_aspect_is_centre_cropped_not_squashed(tmp_path, caplog, film_size, out, rows, cols):
    path = frames_to_video(_moving_pattern(40, size=film_size), tmp_path / "aspect.mp4", fps=25)
    native = video_to_frames(path, size=film_size, frame_skip=1, max_trs=1)
    with caplog.at_level(logging.WARNING, "giblet.data.video"):
        got = video_to_frames(path, size=out, frame_skip=1, max_trs=1)
    np.testing.assert_array_equal(got, native[:, :, rows, cols])    # the middle, at the film's own scale
    assert "centre-cropped, 25% of the picture cut" in caplog.text if film_size == (64, 48) else "centre-cropped" in caplog.text
    pad = video_to_frames(path, size=out, frame_skip=1, max_trs=1, fit="pad")
    assert pad[..., :4, :4, :].max() == 0                            # a black bar at the edge


def test_corrupt_film_names_the_film_and_the_time(film, tmp_path):
    path = film[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{bad}: the film is corrupt: decoding its video stream failed at film time") as e:
        video_to_frames(bad, size=(32, 18))
    t = float(str(e.value).split("film time ")[1].split(" s")[0])
    assert 2.0 < t < 14.0, t                                         # in the middle of the 16 s film, where the damage is
    assert video_to_frames(bad, size=(32, 18), max_trs=1).shape[0] == 1   # the film before the damage still reads
