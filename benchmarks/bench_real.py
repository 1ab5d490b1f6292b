"""The model against himalaya's ridges on a real study: giblet-train at the defaults over several training seeds, each
seed's validation r (what chose its checkpoint, and all a choice of settings may use) and test-block scores with their
block-bootstrap CIs, the share of headline units where the model is below 0 or below
a ridge, and each region's r. The default study is the Alice story-listening fMRI shipped in tests/data/alice.

usage: python benchmarks/bench_real.py [--study SPEC] [--seeds 0 1 2] [--n-folds K] [--set KEY=VALUE ...] [--out DIR]
Prints a markdown table (and writes it to OUT/bench_real.md); nothing is asserted.
"""
import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from giblet import cli

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = (("model", "model"), ("stack", "stack"), ("banded_ridge", "himalaya banded ridge"), ("ridge", "himalaya ridge"))


def run(study, out, seed, n_folds, sets):
    argv = ["--study", str(study), "--out", str(out), "--seed", str(seed), "--device", "cpu", "--config", json.dumps(dict(progress=False))]
    argv += (["--n-folds", str(n_folds)] if n_folds else []) + [a for s in sets for a in ("--set", s)]
    t = time.perf_counter()
    m = cli.train_main(**cli.cli_args(cli.train_main, "giblet-train", argv))
    return m, time.perf_counter() - t


def ci(m, name):
    "(r, CI low, CI high) of one predictor's headline mean r on the test block."
    c = (m.get("stack_comparison") if name == "stack" else m.get("comparison")) or {}
    e = c.get("means", {}).get("model" if name == "stack" else name)   # the stack's comparison calls the stack "model"
    r = m.get("test_voxel_r_selected") if name == "model" else m.get(f"{name}_test_voxel_r_selected")
    return (r, e["ci_low"], e["ci_high"]) if e else (r, np.nan, np.nan)


def val_r(folder):
    "The validation r that chose the run's checkpoint (the early-stopping criterion; a ridge start's epoch 0 included)."
    import torch
    return float(torch.load(Path(folder) / "checkpoints" / "best.pt", weights_only=True, map_location="cpu")["best_r"])


def fmt(v): return "—" if v is None or not np.isfinite(v[0]) else f"{v[0]:+.3f} [{v[1]:+.2f}, {v[2]:+.2f}]"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", default=str(ROOT / "tests" / "data" / "alice" / "alice.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-folds", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="a TrainConfig field, KEY=VALUE (repeat)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_real-"))
    rows, regions, lines = [], {}, []
    for seed in a.seeds:
        m, secs = run(a.study, out / f"seed{seed}", seed, a.n_folds, a.set)
        if a.n_folds:   # outer CV: every fold's test block; the mean over folds (no CI)
            folds = [json.loads((out / f"seed{seed}" / f"fold_{k}" / "metrics.json").read_text()) for k in range(a.n_folds)]
            cells = {n: (float(np.mean([ci(f, n)[0] for f in folds])), np.nan, np.nan) for n, _ in COLUMNS}
            cells["ceiling"] = float(np.mean([f["noise_ceiling_test_selected"] for f in folds]))
            signs = {k: float(np.mean([f["voxel_signs"][k] for f in folds])) for k in ("model_below_0", "model_below_ridge", "model_below_banded_ridge")}
            n_test = sum(f["n_test_trs"] for f in folds)
            val = float(np.mean([val_r(out / f"seed{seed}" / f"fold_{k}") for k in range(a.n_folds)]))
        else:
            cells = {n: ci(m, n) for n, _ in COLUMNS} | {"ceiling": m["noise_ceiling_test_selected"]}
            signs, n_test, val = m["voxel_signs"], m["n_test_trs"], val_r(out / f"seed{seed}")
            for r in m.get("roi_table", []):
                regions.setdefault(r["region"], {}).setdefault(seed, r)
            lines += [f"seed {seed}: {s}" for s in m.get("in_words", [])]
        rows.append((seed, cells, signs, n_test, secs, val))
    head = "| seed | test TRs | validation r (chooses) | " + " | ".join(h for _, h in COLUMNS) + " | noise ceiling | model < 0 | model < ridge | model < banded ridge | seconds |"
    table = [f"study: {a.study}" + (f", {a.n_folds}-fold blocked outer CV (mean over folds)" if a.n_folds else ", test block")
             + (f", --set {' '.join(a.set)}" if a.set else ""), "", head, "|" + "---|" * (head.count("|") - 1)]
    for seed, cells, signs, n_test, secs, val in rows:
        table.append(f"| {seed} | {n_test} | {val:+.3f} | " + " | ".join(fmt(cells[n]) for n, _ in COLUMNS)
                     + f" | {cells['ceiling']:.3f} | {signs['model_below_0']:.0%} | {signs['model_below_ridge']:.0%} | "
                     f"{signs['model_below_banded_ridge']:.0%} | {secs:.0f} |")
    mean = lambda n: float(np.mean([c[n][0] for _, c, _, _, _, _ in rows]))
    table.append(f"| mean | | {np.mean([r[-1] for r in rows]):+.3f} | " + " | ".join(f"{mean(n):+.3f}" for n, _ in COLUMNS) + " | | | | | |")
    if regions:
        table += ["", "Test r per region (seeds " + ", ".join(map(str, a.seeds)) + "):", "",
                  "| region | model | stack | banded ridge | ridge | ceiling |", "|---|---|---|---|---|---|"]
        for name, by in regions.items():
            col = lambda k: " / ".join(f"{by[s].get(k, np.nan):+.2f}" for s in a.seeds if s in by)
            table.append(f"| {name} | {col('model')} | {col('stack')} | {col('banded_ridge')} | {col('ridge')} | {col('noise_ceiling')} |")
    text = "\n".join(table + ([""] + lines if lines else []))
    (out / "bench_real.md").write_text(text + "\n")
    print(text)
    print(f"\n(runs in {out})")


if __name__ == "__main__":
    main()
