"""Benchmark of giblet.data.video.video_to_frames against the decode limit and a seek-per-frame reader.

Writes a test film (default 640x360, 25 fps, 60 s, moving structure) to a temporary folder, then measures on that
one file, in one run:

  (a) a plain PyAV decode to full-size RGB arrays (threaded), every frame: the decode limit;
  (b) video_to_frames at 160x90, frame_skip 2 (the defaults);
  (c) an OpenCV reader that seeks once per sampled frame (CAP_PROP_POS_FRAMES before each read, then resizes):
      the upstream method; it is slow, so it runs on the first `--seek-trs` TR windows only;
  (d) video_to_frames at 120x90 (4:3) from the same 16:9 film: the centre-crop path (scale, then cut the sides).

Rates are in seconds of film per second of wall time (x real time). (a) and (b) alternate and take the best of
`--repeats` runs each.
Targets: (b) >= 0.8x (a), and (b) >= 8x (c). Also prints the peak memory traced during (b) against its output size.

usage: python benchmarks/bench_video.py [--seconds 60] [--size 640x360] [--repeats 3] [--seek-trs 10]
"""
import argparse
import math
import tempfile
import time
import tracemalloc
from pathlib import Path

import av
import cv2
import numpy as np

from giblet.data.video import _moving_pattern, frames_per_tr, frames_to_video, video_info, video_to_frames

TR, FPS, SKIP, OUT_SIZE = 1.5, 25, 2, (160, 90)


def make_film(path, seconds, size):
    n = int(seconds * FPS)
    chunks = (_moving_pattern(min(50, n - s), size=size, fps=FPS, first=s) for s in range(0, n, 50))
    return frames_to_video((f for c in chunks for f in c), path, fps=FPS)


def plain_pyav(path):
    "Every frame decoded and converted to a full-size RGB array (kept only long enough to touch it)."
    n = 0
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for frame in c.decode(s):
            frame.to_ndarray(format="rgb24")
            n += 1
    return n


def opencv_seek(path, n_trs):
    "One seek per sampled frame, as the upstream reader does: the same frames as video_to_frames (25 fps film)."
    cap = cv2.VideoCapture(str(path))
    f = frames_per_tr(FPS, TR, SKIP)
    out = np.empty((n_trs, f, OUT_SIZE[1], OUT_SIZE[0], 3), np.uint8)
    for i in range(n_trs):
        first = math.ceil(i * TR * FPS)
        for j in range(f):
            cap.set(cv2.CAP_PROP_POS_FRAMES, min(first + SKIP * j, math.ceil((i + 1) * TR * FPS) - 1))
            ok, bgr = cap.read()
            if not ok: raise RuntimeError(f"{path}: OpenCV could not read TR {i} frame {j}")
            out[i, j] = cv2.cvtColor(cv2.resize(bgr, OUT_SIZE, interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    cap.release()
    return out


def best_of(fn, repeats):
    best, result = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seek-trs", type=int, default=10)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        film = make_film(Path(tmp) / "bench.mp4", args.seconds, size)
        info = video_info(film)
        print(f"film: {info.width}x{info.height}, {info.fps:g} fps, {info.duration:.1f} s, {info.n_frames} frames, "
              f"{film.stat().st_size / 1e6:.1f} MB (written in {time.perf_counter() - t:.1f} s)")

        t_a = t_b = t_d = math.inf            # (a), (b) and (d) alternate, so all see the same machine load
        for _ in range(args.repeats):
            t, n_a = best_of(lambda: plain_pyav(film), 1); t_a = min(t_a, t)
            t, frames = best_of(lambda: video_to_frames(film), 1); t_b = min(t_b, t)
            t, cropped = best_of(lambda: video_to_frames(film, size=(120, 90)), 1); t_d = min(t_d, t)
        covered_b = frames.shape[0] * TR
        seek_trs = min(args.seek_trs, frames.shape[0])
        t_c = time.perf_counter()
        ref = opencv_seek(film, seek_trs)
        t_c = time.perf_counter() - t_c

        tracemalloc.start()
        video_to_frames(film)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

        rate_a, rate_b, rate_c = info.duration / t_a, covered_b / t_b, seek_trs * TR / t_c
        print(f"(a) plain PyAV decode, full-size RGB : {t_a:6.2f} s  {n_a / t_a:7.1f} frames/s  {rate_a:6.1f}x real time")
        print(f"(b) video_to_frames 160x90 skip 2    : {t_b:6.2f} s  {info.n_frames / t_b:7.1f} frames/s  {rate_b:6.1f}x real time"
              f"  -> {frames.shape} {frames.dtype}")
        print(f"(c) OpenCV seek per sampled frame    : {t_c:6.2f} s  for {seek_trs} TRs ({ref.shape[1] * seek_trs} seeks)"
              f"  {rate_c:6.2f}x real time")
        rate_d = cropped.shape[0] * TR / t_d
        print(f"(d) video_to_frames 120x90 (cropped) : {t_d:6.2f} s  {info.n_frames / t_d:7.1f} frames/s  {rate_d:6.1f}x real time"
              f"  -> {cropped.shape}")
        print(f"ratio (b)/(a) = {rate_b / rate_a:.2f}  (target >= 0.8)")
        print(f"ratio (d)/(b) = {rate_d / rate_b:.2f}  (the centre-crop path against a plain resize)")
        print(f"ratio (b)/(c) = {rate_b / rate_c:.1f}  (target >= 8)")
        print(f"peak memory traced in (b): {peak / 1e6:.1f} MB for an output of {frames.nbytes / 1e6:.1f} MB")
        diff = np.abs(frames[:seek_trs].astype(int) - ref).mean()
        print(f"mean |(b) - (c)| on the common TRs: {diff:.2f} grey levels (same frames, different resizers)")


if __name__ == "__main__":
    main()
