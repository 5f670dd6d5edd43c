"""Would a small MLP gate rank toxic contexts better than DSAS's linear one? An offline probe.

    python benchmarks/dsas_mlp_probe.py [--seeds 0,1,2,3] [--n-fit 128] [--threads 2]
        [--out benchmarks/results/dsas-gates/mlp_probe.json]

For each seed and control pool (in-domain RTP text, WikiText), fits on the testbed preset's fit
sets (the sweep's draw: 128 Davidson offensive/hate tweets vs 128 control texts, text means per
layer) two classifiers per layer: DSAS's PCA(5) + logistic regression, and PCA(r) + an MLP
(scikit-learn ``MLPClassifier``, one hidden layer of 32 ReLU units, L-BFGS, L2 α = 1e-2, the
PCA components standardised). Both are applied per token, like a gate, to held-out RTP toxic and non-toxic texts
(prompt + continuation); the score of a text is the mean over its tokens and over layers of the
predicted probability. It prints and writes the AUROC toxic vs non-toxic (the ranking quality
that bounds any gate built on the classifier) and the held-out S-vs-C accuracy. Not a gate kind
in steerwise: this measures whether building one would pay. Needs ../shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from dsas_gates import text_means, text_sets  # noqa: E402

from steerwise.activations import TOKEN_TEXT, collect_activations  # noqa: E402
from steerwise.eval.data import testbed_data  # noqa: E402
from steerwise.eval.sweep import draw_fit_sets  # noqa: E402
from steerwise.models import load_model  # noqa: E402
from steerwise.sites import resolve_sites  # noqa: E402

SHARED = ROOT.parent / "shared"
console = Console(width=140)


def classifiers(seed: int) -> dict[str, object]:
    return {
        "linear r=5 (DSAS)": make_pipeline(PCA(5, random_state=seed),
                                           LogisticRegression(max_iter=2000)),
        "MLP on r=5": make_pipeline(PCA(5, random_state=seed), StandardScaler(),
                                    MLPClassifier((32,), solver="lbfgs", alpha=1e-2,
                                                  max_iter=2000, random_state=seed)),
        "MLP on r=20": make_pipeline(PCA(20, random_state=seed), StandardScaler(),
                                     MLPClassifier((32,), solver="lbfgs", alpha=1e-2,
                                                   max_iter=2000, random_state=seed)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--n-fit", type=int, default=128)
    ap.add_argument("--n", type=int, default=200, help="held-out texts per set")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default=str(SHARED / "testbed" / "tox-qwen2-7m"))
    ap.add_argument("--data-dir", default=str(SHARED / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/dsas-gates/mlp_probe.json"))
    args = ap.parse_args()
    if not Path(args.data_dir).is_dir():
        console.print(f"[red]{args.data_dir} is absent: this benchmark needs the shared data[/]")
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    sites = resolve_sites(model, "residual", None)
    data = testbed_data(args.data_dir, mmlu_subjects=None)
    held = text_sets(Path(args.data_dir), args.n)
    tokens = {k: collect_activations(model, tok, held[k], sites, pooling=("tokens",),
                                     progress=False) for k in ("rtp_toxic", "rtp_nontoxic")}
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for pool in ("rtp-nontoxic", "wikitext"):
            source, _, control = draw_fit_sets(data, args.n_fit, seed, pool)
            kw = dict(sites=sites, pooling=("mean",), progress=False)
            a_s = collect_activations(model, tok, source, **kw)
            a_c = collect_activations(model, tok, control, **kw)
            scores: dict[str, dict[str, list]] = {}
            for s in sites:
                x = torch.cat([a_s[s.name]["mean"], a_c[s.name]["mean"]]).double().numpy()
                y = np.r_[np.ones(len(source)), np.zeros(len(control))]
                for name, clf in classifiers(seed).items():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        acc = float(cross_val_score(clf, x, y, cv=5).mean())
                        clf.fit(x, y)
                    entry = scores.setdefault(name, {"acc": [], **{k: [] for k in tokens}})
                    entry["acc"].append(acc)
                    for key, acts in tokens.items():
                        t = acts[s.name]
                        p = torch.from_numpy(clf.predict_proba(t["tokens"].double().numpy())[:, 1])
                        entry[key].append(text_means(p.float(), t[TOKEN_TEXT].flatten().long(),
                                                     len(held[key])))
            for name, e in scores.items():
                tox, ben = torch.stack(e["rtp_toxic"]).mean(0), torch.stack(e["rtp_nontoxic"]).mean(0)
                auc = float(roc_auc_score([1] * len(tox) + [0] * len(ben),
                                          torch.cat([tox, ben]).tolist()))
                results.append({"seed": seed, "control": pool, "classifier": name,
                                "cv_accuracy": statistics.fmean(e["acc"]), "auroc_rtp": auc,
                                "mean_rtp_toxic": float(tox.mean()),
                                "mean_rtp_nontoxic": float(ben.mean())})
    table = Table(title="ranking RTP toxic vs non-toxic text by per-token classifier output "
                        "(mean ± std over seeds)")
    for col in ("control", "classifier", "CV accuracy S vs C", "AUROC RTP", "seeds"):
        table.add_column(col, justify="left" if col in ("control", "classifier") else "right")
    summary = []
    for pool in ("rtp-nontoxic", "wikitext"):
        for name in classifiers(0):
            rs = [r for r in results if r["control"] == pool and r["classifier"] == name]
            aucs = [r["auroc_rtp"] for r in rs]
            row = {"control": pool, "classifier": name, "n_seeds": len(rs),
                   "cv_accuracy": statistics.fmean(r["cv_accuracy"] for r in rs),
                   "auroc_rtp": statistics.fmean(aucs),
                   "auroc_rtp_std": statistics.pstdev(aucs) if len(aucs) > 1 else 0.0}
            summary.append(row)
            table.add_row(pool, name, f"{row['cv_accuracy']:.3f}",
                          f"{row['auroc_rtp']:.3f} ± {row['auroc_rtp_std']:.3f}", str(len(rs)))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "per_seed": results}, indent=2) + "\n")
    console.print(f"→ {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
