"""Write words.tsv (onset, end, text: one row per spoken word) from the study's Praat TextGrid (its one IntervalTier, "word").

Silence intervals ("sp" and empty ones) are left out; times stay on the audio clock (20 s of silence pad the start).
Run from this folder: `python make_words.py`.
"""
import csv, re
from pathlib import Path

here = Path(__file__).parent
grid = (here / "stimuli" / "DownTheRabbitHoleFinal_exp120_pad_1.TextGrid").read_text()
intervals = re.findall(r'xmin = ([\d.]+)\s+xmax = ([\d.]+)\s+text = "(.*?)"', grid.split("intervals: size")[1])
words = [(float(a), float(b), t.strip()) for a, b, t in intervals if t.strip() and t.strip().lower() != "sp"]
with open(here / "words.tsv", "w", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["onset", "end", "text"])
    w.writerows((f"{a:.4f}", f"{b:.4f}", t) for a, b, t in words)
print(f"{len(intervals)} intervals, {len(words)} words, {words[0][0]:.2f}-{words[-1][1]:.2f} s")
