"""Activation scaling on the task model: the paper's comparison, measured in one run.

For each task (CCC, IOI) this script
1. measures the task model's clean accuracy on held-out prompts;
2. trains ActivScalar, SteerVec and DynScalar with the library defaults (same prompts, seed, steps);
3. reports, on held-out test prompts, flip accuracy at β = +1 and β = −1, the mean logit
   difference, the faithfulness KL, the ℓ1 norm, the parameter count and the non-zero count;
4. for DynScalar, the same on prompts of other lengths (1 and 2 neutral filler sentences before
   the prompt: +6 and +12 tokens), which positional interventions cannot be applied to;
5. writes heat maps (ActivScalar α, SteerVec ‖v‖, DynScalar α on one test prompt).

Output: ``benchmarks/results/scaling.json``, ``scaling.md`` and ``scaling_<task>_<method>.png``.

    HF_HUB_OFFLINE=1 python benchmarks/scaling_results.py            # task-lm, defaults
    HF_HUB_OFFLINE=1 python benchmarks/scaling_results.py --model gpt2 --n-train 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from steerwise.models import load_model  # noqa: E402
from steerwise.scaling import (  # noqa: E402
    ScaleOptions,
    clean_accuracy,
    evaluate_scaling,
    fit_scaling,
    load_task,
)
from steerwise.scaling.plots import dynamic_scalars, plot_scalars  # noqa: E402

METHODS = ("activscalar", "steervec", "dynscalar")


def _row(task: str, method: str, report: dict, extra: dict | None = None) -> dict:
    pb = report["per_beta"]
    return {
        "task": task, "method": method, "prompt_tokens": report["prompt_tokens"],
        "flip_acc_+1": pb["+1"]["flip_accuracy"], "flip_acc_-1": pb["-1"]["flip_accuracy"],
        "logit_diff_+1": pb["+1"]["logit_diff"], "logit_diff_-1": pb["-1"]["logit_diff"],
        "kl_+1": pb["+1"]["kl"], "kl_-1": pb["-1"]["kl"],
        "clean_logit_diff": report["clean_logit_diff"], "l1": report["l1"],
        "n_parameters": report["n_parameters"], "n_nonzero": report["n_nonzero"],
        **(extra or {}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="task-lm",
                    help="embedded name (task-lm), local directory or hub id")
    ap.add_argument("--tasks", default="ccc,ioi")
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=256)
    ap.add_argument("--steps", type=int, default=None, help="default: ScaleOptions().steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model, device="cpu")
    defaults = ScaleOptions(progress=False, seed=args.seed)
    if args.steps is not None:
        defaults.steps = args.steps

    results: dict = {
        "command": " ".join(["HF_HUB_OFFLINE=1 python benchmarks/scaling_results.py", *sys.argv[1:]]),
        "model": args.model, "torch": torch.__version__, "platform": platform.platform(),
        "threads": args.threads, "options": defaults.to_json(),
        "n_train": args.n_train, "n_test": args.n_test, "clean": {}, "rows": [], "lengths": [],
    }
    for task in args.tasks.split(","):
        train = load_task(task, args.n_train, seed=args.seed, split="train")
        test = load_task(task, args.n_test, seed=args.seed + 1, split="test")
        longer = {k: load_task(task, args.n_test, seed=args.seed + 1, split="test",
                               prefix_sentences=k) for k in (1, 2)}
        results["clean"][task] = {
            "test": clean_accuracy(model, tok, test),
            **{f"test_{k}_fillers": clean_accuracy(model, tok, ex) for k, ex in longer.items()},
        }
        print(f"{task}: clean accuracy {results['clean'][task]['test']['accuracy']:.3f}")
        for method in METHODS:
            opts = ScaleOptions(**{**defaults.__dict__, "method": method})
            t0 = time.perf_counter()
            recipe = fit_scaling(model, tok, train, opts)
            seconds = time.perf_counter() - t0
            report = evaluate_scaling(model, tok, recipe, test)
            train_report = evaluate_scaling(model, tok, recipe, train)
            row = _row(task, method, report, {
                "train_flip_acc_+1": train_report["per_beta"]["+1"]["flip_accuracy"],
                "train_flip_acc_-1": train_report["per_beta"]["-1"]["flip_accuracy"],
                "train_seconds": round(seconds, 2),
            })
            results["rows"].append(row)
            print(f"  {method:11s} flip+1 {row['flip_acc_+1']:.3f} flip-1 {row['flip_acc_-1']:.3f} "
                  f"KL+1 {row['kl_+1']:.4f} params {row['n_parameters']} "
                  f"nonzero {row['n_nonzero']} ({seconds:.0f} s)")
            png = out_dir / f"scaling_{task}_{method}.png"
            if method == "dynscalar":
                values, tokens = dynamic_scalars(model, tok, recipe, test[0].prompt)
                plot_scalars(recipe, png, values=values, tokens=tokens,
                             title=f"{task}: DynScalar α = w·h + b on a test prompt")
                for k, examples in longer.items():
                    rep = evaluate_scaling(model, tok, recipe, examples)
                    results["lengths"].append(_row(task, method, rep, {"fillers": k}))
                    print(f"    +{k} fillers ({rep['prompt_tokens']} tokens): flip+1 "
                          f"{rep['per_beta']['+1']['flip_accuracy']:.3f} flip-1 "
                          f"{rep['per_beta']['-1']['flip_accuracy']:.3f}")
            else:
                plot_scalars(recipe, png, title=f"{task}: {method}")
            row["heat_map"] = png.name
    (out_dir / "scaling.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "scaling.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    o = r["options"]
    lines = [
        "# Activation scaling on the task model",
        "",
        f"`{r['command']}` — model `{r['model']}`, {r['n_train']} training and {r['n_test']} "
        f"held-out test prompts per task, torch {r['torch']}, {r['threads']} CPU thread(s).",
        f"Options (library defaults): λ_F = {o['lambda_f']}, λ_M = {o['lambda_m']}, margin "
        f"{o['margin']}, Adam lr {o['lr']}, {o['steps']} steps, batch {o['batch_size']}, "
        f"β ∈ {o['betas']}, sites {o['sites']}, KL `{o['kl']}`, non-zero = |θ| > "
        f"{o['nonzero_tol']}.",
        "",
        "## Clean accuracy (correct token ranked above the wrong one, held-out prompts)",
        "",
        "| task | prompt | accuracy | top-1 accuracy | mean z_w − z_c |",
        "|---|---|---:|---:|---:|",
    ]
    for task, c in r["clean"].items():
        for key, v in c.items():
            lines.append(f"| {task} | {key.replace('_', ' ')} | {v['accuracy']:.3f} | "
                         f"{v['top1_accuracy']:.3f} | {v['logit_diff']:+.2f} |")
    lines += [
        "",
        "## Interventions on held-out prompts",
        "",
        "| task | method | flip acc β=+1 | flip acc β=−1 | z_w − z_c β=+1 | z_w − z_c β=−1 | "
        "KL β=+1 | KL β=−1 | parameters | non-zero | ℓ1 | train flip +1 / −1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['task']} | {x['method']} | {x['flip_acc_+1']:.3f} | {x['flip_acc_-1']:.3f} | "
            f"{x['logit_diff_+1']:+.2f} | {x['logit_diff_-1']:+.2f} | {x['kl_+1']:.4f} | "
            f"{x['kl_-1']:.4f} | {x['n_parameters']:,} | {x['n_nonzero']:,} | {x['l1']:.2f} | "
            f"{x['train_flip_acc_+1']:.3f} / {x['train_flip_acc_-1']:.3f} |")
    lines += [
        "",
        "## DynScalar on prompt lengths it was not trained on",
        "",
        "| task | fillers | tokens | flip acc β=+1 | flip acc β=−1 | KL β=+1 | KL β=−1 |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for x in r["lengths"]:
        lines.append(f"| {x['task']} | {x['fillers']} | {x['prompt_tokens']} | "
                     f"{x['flip_acc_+1']:.3f} | {x['flip_acc_-1']:.3f} | {x['kl_+1']:.4f} | "
                     f"{x['kl_-1']:.4f} |")
    lines += ["", "Heat maps: " + ", ".join(f"`{x['heat_map']}`" for x in r["rows"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
