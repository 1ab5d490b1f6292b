"""End-to-end tests of giblet.data.audio on films written with PyAV: H.264 video + AAC audio in MP4, odd frame rates,
video-only files, WAV round trips, and every bad input."""
import logging
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from giblet.data.audio import (MEL_FLOOR_DB, audio_to_mel, demo_waveform, frame_times, hop_length, load_audio,
                               log_spectral_distance, mel_to_audio, write_wav)

FILM_SR = 44100            # the film's own audio rate: audio_to_mel resamples to 16 kHz
DURATION = 12.4            # 8 complete 1.5 s TRs and 0.4 s left over
ONSET = 3.0                # a 5 kHz tone starts here (the start of TR 2)


def _write_film(path, wave=None, sr=FILM_SR, fps=Fraction(24000, 1001), duration=DURATION, channels=2):
    """An MP4 with a small H.264 video stream at `fps` and, when `wave` is given, the wave as AAC (copied to `channels`)."""
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = None
        if wave is not None:
            a = c.add_stream("aac", rate=sr)
            a.layout = "stereo" if channels == 2 else "mono"
        for i in range(int(duration * fps)):
            img = np.full((48, 64, 3), (7 * i) % 256, np.uint8)
            for p in v.encode(av.VideoFrame.from_ndarray(img, format="rgb24")): c.mux(p)
        if a is not None:
            block = np.repeat(wave[None].astype(np.float32), channels, 0)
            for s in range(0, block.shape[1], 1024):
                f = av.AudioFrame.from_ndarray(np.ascontiguousarray(block[:, s:s + 1024]), format="fltp",
                                               layout=a.layout.name)
                f.sample_rate, f.pts = sr, s
                for p in a.encode(f): c.mux(p)
            for p in a.encode(None): c.mux(p)
        for p in v.encode(None): c.mux(p)
    return Path(path)


def _soundtrack(sr=FILM_SR, duration=DURATION):
    "demo_waveform plus a 5 kHz tone switched on at exactly ONSET seconds."
    y = demo_waveform(duration, sr=sr, seed=3)
    t = np.arange(len(y)) / sr
    return (y + 0.2 * np.sin(2 * np.pi * 5000 * t) * (t >= ONSET)).astype(np.float32)


@pytest.fixture(scope="module")
def film(tmp_path_factory):
    d = tmp_path_factory.mktemp("audio_film")
    wave = _soundtrack()
    return _write_film(d / "film.mp4", wave), wave


@pytest.fixture(scope="module")
def film_mel(film):
    return audio_to_mel(film[0])


def test_film_shape_only_complete_windows(film_mel):
    assert film_mel.shape == (8, 128, 64) and film_mel.dtype == np.float32
    assert np.isfinite(film_mel).all() and film_mel.max() < 0


def test_film_matches_its_source_waveform(film, film_mel):
    "The AAC film at 44.1 kHz stereo and the float source array give the same log-mel (decode, resample, downmix)."
    ref = audio_to_mel(film[1], sample_rate=FILM_SR)
    assert ref.shape == film_mel.shape
    loud = ref > -70                                   # AAC drops inaudible detail; compare what can be heard
    assert np.corrcoef(ref[loud], film_mel[loud])[0, 1] > 0.99
    assert np.abs(ref - film_mel)[loud].mean() < 1.0


def test_onset_lands_in_its_tr_window(film_mel):
    "Frames are placed by time: the tone switched on at 3.0 s reaches half its level within a frame of 3.0 s."
    band = int(np.argmax(film_mel[-1].mean(1)[100:])) + 100        # the 5 kHz band
    level = film_mel[:, band].reshape(-1)
    steady = np.median(level[-64:])
    first = np.flatnonzero(level > steady - 6)[0]
    centres = frame_times(8).reshape(-1)
    assert abs(centres[first] - ONSET) <= hop_length() / 16000 + 1e-9
    assert first // 64 == 2 or centres[first] < ONSET            # in TR 2, or the last frame before it
    assert level[: 64 + 60].max() < steady - 20                  # TRs 0 and 1 are quiet in that band


def test_start_and_max_trs(film, film_mel):
    cut = audio_to_mel(film[0], start=3.0, max_trs=3)
    assert cut.shape == (3, 128, 64)
    np.testing.assert_allclose(cut, film_mel[2:5], atol=1e-3)
    # a start that is not a multiple of the TR: the same as cutting the waveform there
    wave = load_audio(film[0])
    off = audio_to_mel(film[0], start=0.75, max_trs=2)
    ref = audio_to_mel(wave, sample_rate=16000, start=0.75, max_trs=2)
    np.testing.assert_allclose(off, ref, atol=1e-3)
    assert audio_to_mel(film[0], start=DURATION - 2.0).shape[0] == 1


def test_odd_fps_and_mono_film(tmp_path):
    "A 29.97 fps film with mono 22.05 kHz audio: the audio clock alone decides the windows."
    wave = _soundtrack(sr=22050, duration=7.6)
    path = _write_film(tmp_path / "odd.m4v", wave, sr=22050, fps=Fraction(30000, 1001), duration=7.6, channels=1)
    mel = audio_to_mel(path)
    assert mel.shape == (5, 128, 64)
    ref = audio_to_mel(wave, sample_rate=22050)
    loud = ref > -70
    assert np.corrcoef(ref[loud], mel[loud])[0, 1] > 0.99


def test_round_trip_on_the_film(film_mel, tmp_path):
    "mel -> audio -> WAV -> mel keeps the spectrogram: correlation >= 0.9 (measured ~0.99), LSD a few dB."
    mel = film_mel[:4]
    audio = mel_to_audio(mel)
    assert audio.shape == (4 * 24000,) and audio.dtype == np.float32
    again = audio_to_mel(audio, sample_rate=16000)
    r = np.corrcoef(mel.ravel(), again.ravel())[0, 1]
    lsd = log_spectral_distance(mel, again)
    assert r >= 0.95 and lsd < 3.0, (r, lsd)
    wav = write_wav(tmp_path / "rt.wav", audio, 16000)
    from_file = audio_to_mel(wav)
    assert log_spectral_distance(from_file, again) < 0.1
    assert np.corrcoef(mel.ravel(), from_file.ravel())[0, 1] >= 0.95


def test_round_trip_torch_input_and_determinism():
    mel = audio_to_mel(demo_waveform(3.0), sample_rate=16000)
    a = mel_to_audio(torch.from_numpy(mel), n_iter=8)
    b = mel_to_audio(mel, n_iter=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, mel_to_audio(mel, n_iter=8, seed=1))


def test_wav_files_any_rate_and_channels(tmp_path):
    "WAV at 44.1 kHz stereo reads back resampled to 16 kHz mono, equal to the array path."
    x = demo_waveform(3.2, sr=44100, seed=5)
    path = write_wav(tmp_path / "stereo.wav", np.stack([x, x]), 44100)
    assert log_spectral_distance(audio_to_mel(path), audio_to_mel(x, sample_rate=44100)) < 0.05   # 16-bit PCM
    back = load_audio(path, sr=44100)
    np.testing.assert_allclose(back, x, atol=1 / 32767)


def test_write_wav_is_atomic_and_clips_loudly(tmp_path, caplog):
    path = tmp_path / "loud.wav"
    path.write_bytes(b"old")
    with caplog.at_level(logging.WARNING, logger="giblet.data.audio"):
        write_wav(path, np.array([0.0, 2.0, -3.0, 0.5], np.float32), 8000)
    assert "clipped" in caplog.text and "loud.wav" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loud.wav"]
    np.testing.assert_allclose(load_audio(path, sr=8000), [0, 1, -1, 0.5], atol=1e-4)


# ---- bad input -------------------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        audio_to_mel(tmp_path / "nothere.mp4")


def test_not_a_media_file(tmp_path):
    p = tmp_path / "notes.mp4"
    p.write_bytes(b"\x00\x01 not a film at all " * 10)
    with pytest.raises(ValueError, match="notes.mp4"):
        audio_to_mel(p)


def test_video_only_film(tmp_path, caplog):
    path = _write_film(tmp_path / "silent.mp4", None, duration=4.0)
    with pytest.raises(ValueError, match=r"silent\.mp4: no audio stream.*allow_silence"):
        audio_to_mel(path)
    with caplog.at_level(logging.WARNING, logger="giblet.data.audio"):
        mel = audio_to_mel(path, allow_silence=True)
    assert "silence" in caplog.text
    assert mel.shape == (2, 128, 64) and (mel == MEL_FLOOR_DB).all()
    assert audio_to_mel(path, allow_silence=True, max_trs=1).shape == (1, 128, 64)


def test_too_short(film):
    with pytest.raises(ValueError, match="no complete"):
        audio_to_mel(np.zeros(20000, np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match="film.mp4.*no complete"):
        audio_to_mel(film[0], start=DURATION - 1.0)


def test_wrong_shapes_and_values():
    with pytest.raises(ValueError, match="shape"):
        audio_to_mel(np.zeros((2, 2, 48000), np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match="float"):
        audio_to_mel(np.zeros(48000, np.int16), sample_rate=16000)
    with pytest.raises(ValueError, match="NaN"):
        audio_to_mel(np.full(48000, np.nan, np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match=r"\(n_trs, n_mels, frames_per_tr\)"):
        mel_to_audio(np.zeros((128, 64), np.float32))
    with pytest.raises(ValueError, match="finite"):
        mel_to_audio(np.full((1, 128, 64), np.nan, np.float32))
    with pytest.raises(ValueError, match="not a whole number"):
        mel_to_audio(np.zeros((1, 128, 70), np.float32))
    with pytest.raises(ValueError, match="x.wav"):
        write_wav("x.wav", np.zeros((1, 1, 10), np.float32))
    with pytest.raises(ValueError, match="one shape"):
        log_spectral_distance(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="hold no STFT bin"):
        audio_to_mel(np.zeros(48000, np.float32), sample_rate=16000, n_fft=256, frames_per_tr=100)
    with pytest.raises(ValueError, match="shorter than the hop"):
        audio_to_mel(np.zeros(48000, np.float32), sample_rate=16000, n_fft=256, frames_per_tr=16, n_mels=16)


def test_sample_rate_mismatch(film):
    x = demo_waveform(3.0, sr=16000, seed=2)
    with pytest.raises(ValueError, match="needs its sample_rate"):
        audio_to_mel(x)
    with pytest.raises(ValueError, match="positive"):
        audio_to_mel(x, sample_rate=0)
    with pytest.raises(ValueError, match="film.mp4: sample_rate is for waveform arrays"):
        audio_to_mel(film[0], sample_rate=44100)
    with pytest.raises(ValueError, match="not a whole number"):
        audio_to_mel(x, sample_rate=16000, sr=22050)         # 22050·1.5/64 is not an integer hop
    # the same sound given at 48 kHz is resampled, not misread as 16 kHz
    def chord(rate):
        t = np.arange(int(3.0 * rate)) / rate
        return sum(0.2 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * t / p) > 0)
                   for f, p in ((300, 1.0), (1234, 1.4), (4321, 2.2))).astype(np.float32)
    a, b = audio_to_mel(chord(16000), sample_rate=16000), audio_to_mel(chord(48000), sample_rate=48000)
    assert a.shape == b.shape == (2, 128, 64)
    loud = a > -60
    assert np.corrcoef(a[loud], b[loud])[0, 1] > 0.99 and np.abs(a - b)[loud].mean() < 0.5
    assert audio_to_mel(chord(48000), sample_rate=16000).shape[0] == 6   # misread as 16 kHz it would last 9 s


def test_corrupt_film_names_the_film_and_the_time(film, tmp_path):
    data = bytearray(film[0].read_bytes())
    data[len(data) // 2:len(data) // 2 + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{bad}: the film is corrupt: decoding its audio stream failed at film time") as e:
        audio_to_mel(bad)
    t = float(str(e.value).split("film time ")[1].split(" s")[0])
    assert 0.0 < t < DURATION, t
