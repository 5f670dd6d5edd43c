"""Where do DSAS gates open? Gate values of every recipe of a sweep on held-out text sets.

    python benchmarks/dsas_gates.py SWEEP_DIR [SWEEP_DIR ...] [--n 200] [--threads 2]
        [--out benchmarks/results/dsas-gates/gate_values.json]
    python benchmarks/dsas_gates.py --fit r1=dsas,n_components=1 --fit r20=dsas,n_components=20
        [--n-fit 128] [--seeds 0] [--out ...]

For each fitted recipe under ``SWEEP_DIR/recipes/`` (one per method × gate × seed), or each
gate variant given with ``--fit`` (``steerwise sweep --gate-variant`` syntax; CAA, fitted on the
testbed preset's pools exactly as the sweep draws them), the
effective per-token strength ``s(t) = Σ_l a_l g_l(t) / Σ_l [a_l > 0]`` (the mean over the steered
layers of layer scale × gate, what multiplies λ) is averaged over the tokens of each text of:

* RTP toxic: held-out toxic prompts + their continuations (``rtp_toxic.jsonl`` odd rows) —
  the domain the toxicity evaluation samples from;
* RTP non-toxic: held-out non-toxic prompts + continuations (last 200 rows of
  ``rtp_nontoxic.jsonl``) — the in-domain benign text of the perplexity headline;
* WikiText: pieces of the held-out WikiText-2 test articles (0, 10, 20, …);
* ToxiGen hate / neutral statements (``toxigen_statements.jsonl``): a domain no gate was fitted
  on (transfer).

It prints and writes the mean strength per set and the AUROC of the per-text strength for
RTP toxic vs non-toxic (in domain) and ToxiGen hate vs neutral (transfer): a gate that detects
the behaviour has a high AUROC on both; one that detects the domain opens on all RTP text alike.
The "ratio" column is mean strength on RTP toxic / on RTP non-toxic: how much more steering
toxic contexts get than benign in-domain ones at the same λ. The JSON also holds each layer's
AUROC and held-out gate accuracy. Needs ../shared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.activations import TOKEN_TEXT, collect_activations  # noqa: E402
from steerwise.eval.data import read_jsonl, wikitext_articles, word_chunks  # noqa: E402
from steerwise.gates import StepContext  # noqa: E402
from steerwise.models import load_model  # noqa: E402
from steerwise.recipe import Recipe  # noqa: E402

SHARED = ROOT.parent / "shared"
console = Console(width=170)


def text_sets(data: Path, n: int) -> dict[str, list[str]]:
    toxic = read_jsonl(data / "rtp_toxic.jsonl")[1::2][:n]
    nontoxic = read_jsonl(data / "rtp_nontoxic.jsonl")[-200:][:n]
    articles = wikitext_articles(data / "wikitext2_test.txt")
    wiki = [c for a in articles[::10] for c in word_chunks(a)][:n]
    tg = read_jsonl(data / "toxigen_statements.jsonl")
    return {
        "rtp_toxic": [r["prompt"] + r["continuation"] for r in toxic],
        "rtp_nontoxic": [r["prompt"] + r["continuation"] for r in nontoxic],
        "wikitext": wiki,
        "toxigen_hate": [r["text"] for r in tg if r["label"] == "hate"][:n],
        "toxigen_neutral": [r["text"] for r in tg if r["label"] == "neutral"][:n],
    }


def token_gates(gate, a: dict) -> torch.Tensor:
    """The gate's value at every collected token (a text's tokens are contiguous and in order,
    so a prefix-mean gate gets the running mean of its text's dot products)."""
    if getattr(gate, "apply_on", "tokens") == "prefix-mean" and not gate.constant:
        z = (a["tokens"] @ gate.weight).double()
        owner = a[TOKEN_TEXT].flatten().long()
        start = torch.ones_like(owner, dtype=torch.bool)
        start[1:] = owner[1:] != owner[:-1]
        seg = torch.cumsum(start.long(), 0) - 1
        first = torch.nonzero(start).flatten()
        cs = torch.cumsum(z, 0)
        before = torch.where(first > 0, cs[first - 1], torch.zeros_like(cs[first]))
        pos = torch.arange(len(z)) - first[seg] + 1
        return torch.sigmoid((cs - before[seg]) / pos + gate.bias.double()).float()
    g = gate(a["tokens"], StepContext())
    return torch.ones(a["tokens"].shape[0]) if g is None else g.detach().float()


def text_strengths(recipe: Recipe, acts: dict, n_texts: int) -> torch.Tensor:
    """Per text: mean over its tokens of the mean over steered layers of a_l · g_l(t)."""
    steered = [e for e in recipe.entries if e.scale > 0]
    if not steered:
        return torch.zeros(n_texts)
    total = None
    for e in steered:
        g = token_gates(e.gate, acts[e.site.name])
        total = e.scale * g if total is None else total + e.scale * g
    owner = acts[steered[0].site.name][TOKEN_TEXT].flatten().long()
    return text_means(total / len(steered), owner, n_texts)


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    y = [1] * len(pos) + [0] * len(neg)
    x = torch.cat([pos, neg]).tolist()
    return float(roc_auc_score(y, x)) if len(set(x)) > 1 else 0.5


def text_means(values: torch.Tensor, owner: torch.Tensor, n_texts: int) -> torch.Tensor:
    sums = torch.zeros(n_texts).index_add_(0, owner, values)
    return sums / torch.zeros(n_texts).index_add_(0, owner, torch.ones_like(values))


def layer_aurocs(recipe: Recipe, acts: dict, sets: dict[str, list[str]]) -> list[float]:
    """Per layer: AUROC of the per-text gate value, RTP toxic vs non-toxic."""
    out = []
    for e in recipe.entries:
        per_set = {}
        for key in ("rtp_toxic", "rtp_nontoxic"):
            a = acts[key][e.site.name]
            g = token_gates(e.gate, a)
            per_set[key] = text_means(g, a[TOKEN_TEXT].flatten().long(), len(sets[key]))
        out.append(auroc(per_set["rtp_toxic"], per_set["rtp_nontoxic"]))
    return out


def fitted_recipes(model, tok, specs: list[str], n_fit: int, seeds: list[int], data_dir: Path):
    """(name, method, gate, seed, recipe) for each ``--fit`` variant and seed, fitted like the
    sweep fits them."""
    from steerwise.eval.cli import parse_gate_variant
    from steerwise.eval.data import testbed_data
    from steerwise.eval.sweep import SweepConfig, fit_sweep_recipe

    data = testbed_data(data_dir, mmlu_subjects=None)
    variants = dict(parse_gate_variant(v) for v in specs)
    cfg = SweepConfig(methods=["caa"], gates=list(variants), gate_variants=variants, n_fit=n_fit)
    for name in variants:
        for seed in seeds:
            recipe, _ = fit_sweep_recipe(model, tok, data, cfg, "caa", name, seed)
            yield "fit", "caa", name, seed, recipe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="*", help="sweep output directories (with recipes/)")
    ap.add_argument("--fit", action="append", default=[], metavar="NAME=KIND[,key=value...]",
                    help="fit this gate variant (CAA) instead of reading a sweep (repeatable)")
    ap.add_argument("--n-fit", type=int, default=128, help="examples per fitting set (--fit)")
    ap.add_argument("--seeds", default="0", help="fit seeds, comma-separated (--fit)")
    ap.add_argument("--model", default=str(SHARED / "testbed" / "tox-qwen2-7m"))
    ap.add_argument("--data-dir", default=str(SHARED / "data"))
    ap.add_argument("--n", type=int, default=200, help="texts per set")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/dsas-gates/gate_values.json"))
    args = ap.parse_args()
    if not Path(args.data_dir).is_dir():
        console.print(f"[red]{args.data_dir} is absent: this benchmark needs the shared data[/]")
        return 1
    if not args.sweeps and not args.fit:
        ap.error("give sweep directories or --fit variants")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, dtype="float32", device="cpu")
    sets = text_sets(Path(args.data_dir), args.n)
    recipes = [(str(d.parent.parent), *d.name.split("__"), d) for s in args.sweeps
               for d in sorted((Path(s) / "recipes").glob("*")) if (d / "steerwise.json").is_file()]
    recipes = [(src, m, g, int(sd.removeprefix("seed")), Recipe.from_pretrained(d))
               for src, m, g, sd, d in recipes]
    recipes += list(fitted_recipes(model, tok, args.fit, args.n_fit,
                                   [int(x) for x in args.seeds.split(",")], Path(args.data_dir)))
    if not recipes:
        console.print("[red]no recipes under the given sweep directories[/]")
        return 1
    sites = {e.site.name: e.site for e in recipes[0][4].entries}
    acts = {name: collect_activations(model, tok, texts, list(sites.values()),
                                      pooling=("tokens",), progress=False)
            for name, texts in sets.items()}
    per_recipe = []
    for source, method, gate, seed, recipe in recipes:
        st = {name: text_strengths(recipe, acts[name], len(texts)) for name, texts in sets.items()}
        per_recipe.append({
            "source": source, "method": method, "gate": gate, "seed": seed,
            **{f"mean_{k}": float(v.mean()) for k, v in st.items()},
            "auroc_rtp": auroc(st["rtp_toxic"], st["rtp_nontoxic"]),
            "auroc_toxigen": auroc(st["toxigen_hate"], st["toxigen_neutral"]),
            "layer_auroc_rtp": layer_aurocs(recipe, acts, sets),
            "layer_gate_accuracy": [e.diagnostics.get("gate_accuracy") for e in recipe.entries],
            "layer_scale": [e.scale for e in recipe.entries],
        })
    # mean ± std over seeds per (sweep or --fit, method, gate)
    keys = [k for k in per_recipe[0] if k.startswith(("mean_", "auroc_"))]
    summary = []
    for source, method, gate in sorted({(r["source"], r["method"], r["gate"])
                                        for r in per_recipe}):
        rs = [r for r in per_recipe
              if (r["source"], r["method"], r["gate"]) == (source, method, gate)]
        row = {"source": source, "method": method, "gate": gate, "n_seeds": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs]
            row[k] = statistics.fmean(vals)
            row[k + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        row["ratio_rtp"] = row["mean_rtp_toxic"] / max(row["mean_rtp_nontoxic"], 1e-12)
        row["layer_auroc_rtp"] = [statistics.fmean(v) for v in zip(*(r["layer_auroc_rtp"]
                                                                     for r in rs))]
        summary.append(row)
    table = Table(title="mean effective gate strength per text set; AUROC of per-text strength")
    for col in ("from", "method", "gate", "RTP toxic", "RTP benign", "ratio", "WikiText", "ToxiGen hate",
                "ToxiGen neutral", "AUROC RTP", "AUROC ToxiGen", "seeds"):
        table.add_column(col, justify="left" if col in ("from", "method", "gate") else "right")
    for r in summary:
        table.add_row(Path(r["source"]).name, r["method"], r["gate"], *(f"{r[k]:.3f}" for k in (
            "mean_rtp_toxic", "mean_rtp_nontoxic")), f"{r['ratio_rtp']:.2f}",
            *(f"{r[k]:.3f}" for k in ("mean_wikitext", "mean_toxigen_hate",
                                      "mean_toxigen_neutral")),
            f"{r['auroc_rtp']:.3f} ± {r['auroc_rtp_std']:.3f}",
            f"{r['auroc_toxigen']:.3f} ± {r['auroc_toxigen_std']:.3f}", str(r["n_seeds"]))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"sets": {k: len(v) for k, v in sets.items()},
                               "summary": summary, "per_recipe": per_recipe}, indent=2) + "\n")
    console.print(f"→ {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
