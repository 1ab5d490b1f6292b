"""Benchmark of giblet.features: extraction throughput and cache size of each kind of feature stream.

Builds, in a temporary folder, a test film (default 160x90, 25 fps, 90 s, with sound), a word-timed transcript
(2.5 words per second) and one tiny random-initialised backbone per kind (`giblet.features.tiny_backbone`: DINOv2
image model, VideoMAE video model, wav2vec 2.0, GPT-2), then for each stream measures:

  - cold: `extract_stream` into an empty cache (model load, decoding the windows, the forward passes, the writes),
    in TRs per second of wall time;
  - inputs: cutting the windows alone (frame decode for video, clips for audio, contexts for text), TRs per second;
  - warm: finding, checking and memory-mapping the finished cache, in milliseconds;
  - cache: bytes of features.npy per 1000 TRs (its 128-byte header left out), and the manifest's fixed size.

The tiny models are so small that the figures mostly measure giblet's own work (decoding, windowing, caching), an
upper bound on the rate a real backbone reaches. The cache size scales as 2 bytes x width x layers per TR; the
widths of a few real backbones are printed for reference (computed, not measured).

usage: python benchmarks/bench_features.py [--seconds 90] [--tr 1.5] [--device cpu] [--batch-size 16] [--threads 1]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the tiny models are on disk

import numpy as np
import pandas as pd
import torch

import giblet.features as gf
from giblet.study import parse_stream_spec
from giblet.data.audio import demo_waveform
from giblet.data.video import _moving_pattern, frames_to_video

FPS, SR = 25, 16000
REAL_WIDTHS = {"DINOv2-small": 384, "CLIP ViT-B/16 vision": 768, "V-JEPA 2 ViT-L": 1024, "wav2vec 2.0 base": 768,
               "w2v-BERT 2.0": 1024, "Llama-3.2-3B": 3072}


def make_stimulus(folder, seconds):
    n = int(seconds * FPS)
    chunks = (_moving_pattern(min(50, n - s), size=(160, 90), fps=FPS, first=s) for s in range(0, n, 50))
    film = frames_to_video((f for c in chunks for f in c), folder / "film.mp4", FPS,
                           audio=0.5 * demo_waveform(seconds, SR), sample_rate=SR)
    vocab = "sherlock watson walks into the room and says hello to a man who waits in the dark".split()
    onsets = np.arange(0.2, seconds, 0.4)
    words = pd.DataFrame({"onset": onsets, "duration": 0.3, "word": [vocab[i % len(vocab)] for i in range(len(onsets))]})
    words.to_csv(folder / "words.tsv", sep="\t", index=False)
    return film, folder / "words.tsv", vocab


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=90.0)
    ap.add_argument("--tr", type=float, default=1.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench_features_"))
    film, tsv, vocab = make_stimulus(root, args.seconds)
    models = {k: gf.tiny_backbone(root / "models" / k, k, words=vocab) for k in ("image", "video", "audio", "text")}
    times = np.arange(int((args.seconds - 0.1) // args.tr)) * args.tr
    n = len(times)
    streams = [("image", f"video={models['image']}:-1", film), ("image, context 2 TRs", f"video={models['image']}:-1:context_trs=2", film),
               ("video (VideoMAE)", f"video={models['video']}:-1", film), ("audio", f"audio={models['audio']}:-1", film),
               ("audio, context 2 TRs", f"audio={models['audio']}:-1:context_trs=2", film), ("text", f"text={models['text']}:-1", tsv)]
    print(f"{n} TRs of {args.tr} s, film 160x90 at {FPS} fps, device {args.device}, {args.threads} thread(s), batch {args.batch_size}")
    print(f"{'stream':24s} {'width':>5s} {'cold TR/s':>10s} {'inputs TR/s':>12s} {'warm ms':>8s} {'kB/1000 TRs':>12s} {'manifest kB':>12s}")
    for label, text, src in streams:   # warm-up: imports, first decodes and first forward passes are not measured
        gf.extract_stream(text, src, times[:4], args.tr, root / "warmup", device=args.device, progress=False)
    for label, text, src in streams:
        spec = parse_stream_spec(text)
        cache = root / "cache" / label.replace(" ", "_").replace(",", "")
        t0 = time.perf_counter()
        folder = gf.extract_stream(spec, src, times, args.tr, cache, device=args.device, batch_size=args.batch_size, progress=False)
        cold = time.perf_counter() - t0
        bb = gf.load_backbone(spec)
        t0 = time.perf_counter()
        inputs = gf._Inputs(spec, src, times, args.tr)
        for a in range(0, n, 64): inputs(bb, np.arange(a, min(n, a + 64)))
        t_in = time.perf_counter() - t0
        t0 = time.perf_counter()
        gf.extract_stream(spec, src, times, args.tr, cache, progress=False)
        arr = np.asarray(gf.load_stream(folder), np.float32)
        warm = time.perf_counter() - t0
        data = (folder / "features.npy").stat().st_size - 128
        print(f"{label:24s} {arr.shape[1]:5d} {n / cold:10.1f} {n / t_in:12.1f} {1000 * warm:8.1f} {data / n:12.1f} "
              f"{(folder / 'manifest.json').stat().st_size / 1000:12.1f}")
    print("\ncache size of real backbones (float16, one layer; computed): " +
          ", ".join(f"{k} {2 * d * 1000 / 1e6:.2f} MB" for k, d in REAL_WIDTHS.items()) + " per 1000 TRs")


if __name__ == "__main__":
    main()
