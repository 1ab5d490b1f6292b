"""Benchmark giblet.data.audio: decode + log-mel speed, Griffin-Lim speed, and the mel -> audio -> mel round trip.

Prints figures; asserts nothing. The round trip is measured on the synthetic study's film (giblet.synthetic) and on
an AAC film of `demo_waveform`.
usage: python benchmarks/bench_audio.py [--trs 40] [--iters 100]
"""
import argparse
import resource
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from giblet.data.audio import audio_to_mel, demo_waveform, log_spectral_distance, mel_to_audio


def _aac_film(path, wave, sr):
    "A small H.264 + AAC MP4 holding `wave` (mono float32 at `sr`)."
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=Fraction(25))
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("aac", rate=sr)
        a.layout = "mono"
        for i in range(int(len(wave) / sr * 25)):
            for p in v.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")): c.mux(p)
        for s in range(0, len(wave), 1024):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[None, s:s + 1024]), format="fltp", layout="mono")
            f.sample_rate, f.pts = sr, s
            for p in a.encode(f): c.mux(p)
        for p in a.encode(None): c.mux(p)
        for p in v.encode(None): c.mux(p)
    return path


def _round_trip(name, film, n_trs, iters):
    t = time.perf_counter()
    mel = audio_to_mel(film, max_trs=n_trs)
    t_mel = time.perf_counter() - t
    t = time.perf_counter()
    audio = mel_to_audio(mel, n_iter=iters)
    t_gl = time.perf_counter() - t
    again = audio_to_mel(audio, sample_rate=16000)
    r = np.corrcoef(mel.ravel(), again.ravel())[0, 1]
    audible = mel > -80
    r_aud = np.corrcoef(mel[audible], again[audible])[0, 1]
    secs = mel.shape[0] * 1.5
    print(f"{name}: {mel.shape[0]} TRs ({secs:.0f} s), mel {tuple(mel.shape)}")
    print(f"  round trip mel->audio->mel: r = {r:.4f} (bins above -80 dB: r = {r_aud:.4f}), "
          f"log-spectral distance = {log_spectral_distance(mel, again):.2f} dB")
    print(f"  decode+mel {t_mel:.2f} s ({secs / t_mel:.0f}x real time); "
          f"mel_to_audio ({iters} iterations) {t_gl:.2f} s ({secs / t_gl:.1f}x real time)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trs", type=int, default=40)
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        try:
            from giblet.synthetic import make_dataset
            layout = make_dataset(d / "study", n_subjects=1, n_trs=max(args.trs, 20), seed=0)
            _round_trip("synthetic study film", layout.film, args.trs, args.iters)
        except ImportError as e:
            print(f"synthetic study film: skipped ({e})")
        wave = demo_waveform(args.trs * 1.5 + 0.5, sr=16000, seed=0)
        _round_trip("demo_waveform AAC film", _aac_film(d / "demo.mp4", wave, 16000), args.trs, args.iters)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
