"""Decoding scores of the CPU main job's model on the embedded study's test block, beside the shifted null.

Trains `giblet.training.trainer` with the default `TrainConfig` (what `giblet-train` runs), then decodes the test block from the
predicted brain layer and from measured fMRI with `giblet.decoding`. Options change the run, e.g.

    python benchmarks/bench_decoding.py --set detach_brain=False --model decoder_rank=0 --json out.json
"""
import argparse, json, logging, os, time

import numpy as np
import torch

from giblet.decoding import decode_block, decoding_scores, true_block
from giblet.training.config import TrainConfig
from giblet.training.data import prepare_data
from giblet.training.trainer import Trainer


def parse(kvs):
    return {k: json.loads(v) if v[:1] in "[{0123456789-tf" else v for k, v in (s.split("=", 1) for s in kvs)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig KEY=VALUE (JSON values)")
    ap.add_argument("--model", nargs="*", default=[], help="model_overrides KEY=VALUE, added to the preset's overrides")
    ap.add_argument("--json", help="write the tables here")
    ap.add_argument("--n-shifts", type=int, default=20)
    ap.add_argument("--truth", action="store_true", help="also the test-block r with the planted signal per ROI (no baselines)")
    ap.add_argument("--no-decode", action="store_true", help="skip the decoding scores")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.basicConfig(level=logging.WARNING)
    sets = parse(a.set)
    cfg = TrainConfig.make(progress=False, device="cpu", **sets)
    if a.model: cfg = cfg.updated(model_overrides={**cfg.model.model_overrides, **parse(a.model)})
    data = prepare_data(cfg, "cpu")
    t0 = time.perf_counter()
    tr = Trainer(data, cfg)
    tr.fit()
    fit_s = time.perf_counter() - t0
    from giblet.metrics import voxel_r
    test = data.split.test
    with tr.averaged(): r = voxel_r(tr.predict(test), data.average_bold(test))  # the moving-average weights, as saved
    out = dict(set=sets, model=parse(a.model), fit_s=fit_s, test_voxel_r=float(np.mean(r)), best_epoch=tr.best_epoch, tables={})
    true = true_block(data.tensors, test)
    print(f"fit {fit_s:.0f} s, best epoch {tr.best_epoch}, test voxel r {np.mean(r):.3f}, {len(test)} test TRs")
    if a.truth:
        from giblet.evaluation import evaluate_run
        with tr.averaged(): m = evaluate_run(tr, baseline=False, n_boot=10)["metrics"]
        out["truth"] = {k: v for k, v in m.items() if k.startswith("truth_r") or k.startswith("test_voxel_r")}
        print(json.dumps(out["truth"], indent=1))
    with tr.averaged():
        k = tr.model.config.context_trs
        # the middle of the window (what giblet.decoding does), and its last TR (where the report figure reads each TR)
        for source, pos in () if a.no_decode else (("brain", None), ("fmri", None), ("brain", k - 1)):
            dec, null = decode_block(tr.model, data.tensors, test, source, tr=float(data.aligned.tr), n_shifts=a.n_shifts, position=pos)
            t = decoding_scores(dec, true, float(data.aligned.tr), null)
            # how much the decoded output varies over TRs, relative to the truth's variation (1: as much; 0: constant)
            t["spread"] = [np.std(dec[m].astype(np.float64), 0).mean() / np.std(np.asarray(true[m], np.float64) / (255.0 if m == "video" else 1), 0).mean()
                           for m, _ in t.index]
            name = source if pos is None else f"{source}, TR at position {pos} of {k}"
            print(f"\n== decoded from {name}\n" + t.round(3).to_string())
            out["tables"][name] = t.reset_index().to_dict("records")
    if a.json:
        with open(a.json + ".tmp", "w") as f: json.dump(out, f, indent=1, default=float)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
