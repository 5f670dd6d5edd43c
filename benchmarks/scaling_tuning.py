"""Small hyper-parameter check for activation scaling, on the TRAIN split only.

Fits one method on 128 training prompts (``split="train"``, seed 0) with each setting given as
JSON overrides of ``ScaleOptions``, and judges it on a validation slice of the *train* split
(generator seed 1000, prompts that also occur in the training set removed, at most 128). The
test split is never touched. One JSON line per setting is printed and appended to ``--out``.

    HF_HUB_OFFLINE=1 python benchmarks/scaling_tuning.py ccc dynscalar '[{}, {"lr": 0.003}]'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steerwise.models import load_model  # noqa: E402
from steerwise.scaling import ScaleOptions, evaluate_scaling, fit_scaling, load_task  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("task")
    ap.add_argument("method")
    ap.add_argument("settings", help="JSON list of ScaleOptions overrides, e.g. '[{}, {\"lr\": 0.1}]'")
    ap.add_argument("--model", default="task-lm")
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scaling_tuning.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model, device="cpu")
    train = load_task(args.task, args.n_train, seed=0, split="train")
    seen = {e.prompt for e in train}
    val = [e for e in load_task(args.task, 160, seed=1000, split="train")
           if e.prompt not in seen][:128]
    for overrides in json.loads(args.settings):
        t0 = time.perf_counter()
        recipe = fit_scaling(model, tok, train,
                             ScaleOptions(method=args.method, progress=False, **overrides))
        seconds = time.perf_counter() - t0
        rep = evaluate_scaling(model, tok, recipe, val)
        pb = rep["per_beta"]
        row = {
            "task": args.task, "method": args.method, **overrides, "n_val": len(val),
            "f1": round(pb["+1"]["flip_accuracy"], 3), "fm1": round(pb["-1"]["flip_accuracy"], 3),
            "ld1": round(pb["+1"]["logit_diff"], 2), "ldm1": round(pb["-1"]["logit_diff"], 2),
            "kl1": round(pb["+1"]["kl"], 3), "klm1": round(pb["-1"]["kl"], 3),
            "l1": round(rep["l1"], 2), "nnz": rep["n_nonzero"], "npar": rep["n_parameters"],
            "sec": round(seconds, 1),
        }
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
