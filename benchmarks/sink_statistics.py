"""The attention sink in fitted statistics, on a real model: how the first token skews CAA.

    python scripts/toxicity_sets.py --data ../shared/data --out /tmp/sets --n 64
    python benchmarks/sink_statistics.py --model /work/cache/gemma3-270m/hf --sets /tmp/sets

Per residual layer of the model (all layers):

1. the first real token's residual norm (the attention sink: on Gemma 3 270M the ``<bos>``,
   which sees only itself, so it is the same vector for every text) against the median norm of
   the other tokens of the source texts;
2. the CAA vector mean(T) − mean(S) (``steerwise.fit``, method ``caa``, gate ``none``) fitted with
   the old statistics (``sink_free=False``: the first token in every mean) and the new ones
   (``sink_free=True``, the default): their norms, each one's cosine with the sink activation,
   and the cosine between the two vectors.

S = toxic tweets (``toxic.txt``), T = non-toxic tweets (``nontoxic.txt``), as
scripts/toxicity_sets.py writes them. With the first token in, mean pooling gives it weight
1/length, so mean(T) − mean(S) carries (1/len_T − 1/len_S) times the sink: a length difference,
not a behaviour. Writes benchmarks/results/sink_statistics.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.activations import TOKEN_TEXT, collect_activations, max_model_length, tokenize  # noqa: E402
from steerwise.fit import fit  # noqa: E402
from steerwise.models import load_model  # noqa: E402
from steerwise.sites import resolve_sites  # noqa: E402

console = Console(width=150)


def read_set(path: Path, n: int) -> list[str]:
    if not path.is_file():
        raise SystemExit(f"missing set {path}: write the sets with scripts/toxicity_sets.py")
    texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()][:n]
    if not texts:
        raise SystemExit(f"set {path} is empty")
    return texts


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/work/cache/gemma3-270m/hf",
                    help="HF directory or hub id (default: the Gemma 3 270M float32 directory)")
    ap.add_argument("--sets", default="/tmp/sets", help="folder with toxic.txt and nontoxic.txt")
    ap.add_argument("--n", type=int, default=64, help="texts per set")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sink_statistics.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    sets = Path(args.sets)
    source = read_set(sets / "toxic.txt", args.n)
    target = read_set(sets / "nontoxic.txt", args.n)
    started = time.perf_counter()
    model, tok = load_model(args.model, device="cpu")
    load_s = time.perf_counter() - started
    sites = resolve_sites(model, "residual", None)
    limit = max_model_length(model, tok)
    len_s = statistics.mean(len(r) for r in tokenize(tok, source, limit))
    len_t = statistics.mean(len(r) for r in tokenize(tok, target, limit))
    first_ids = {r[0] for r in tokenize(tok, source + target, limit)}

    t0 = time.perf_counter()
    kw = dict(method="caa", gate="none", layers=None, probe_accuracy=False,
              batch_size=args.batch_size, default_strength=1.0, progress=False)
    old = fit(model, tok, source, target=target, sink_free=False, **kw)
    new = fit(model, tok, source, target=target, sink_free=True, **kw)
    fit_s = time.perf_counter() - t0
    # every token of the source texts (the sink included) for the norms
    toks = collect_activations(model, tok, source, sites, pooling=("tokens",),
                               batch_size=args.batch_size, progress=False, sink_free=False)

    rows = []
    for site, e_old, e_new in zip(sites, old.entries, new.entries):
        x, owner = toks[site.name]["tokens"], toks[site.name][TOKEN_TEXT].flatten().long()
        first = torch.ones(len(owner), dtype=torch.bool)
        first[1:] = owner[1:] != owner[:-1]  # each text's rows start with its first token
        sink_rows, other = x[first], x[~first]
        sink = sink_rows.mean(0)
        spread = min(cos(r, sink) for r in sink_rows)
        v_old, v_new = e_old.map.vector, e_new.map.vector
        rows.append({
            "layer": site.layer,
            "sink_norm": float(sink.norm()),
            "sink_min_cosine_across_texts": spread,
            "median_token_norm": float(other.norm(dim=1).median()),
            "sink_to_median": float(sink.norm() / other.norm(dim=1).median()),
            "caa_norm_with_sink": float(v_old.norm()),
            "caa_norm_sink_free": float(v_new.norm()),
            "norm_ratio_with_to_free": float(v_old.norm() / v_new.norm()),
            "cos_with_sink_old": cos(v_old, sink),
            "cos_with_sink_new": cos(v_new, sink),
            "cos_old_new": cos(v_old, v_new),
        })

    table = Table(title=f"sink statistics: {Path(args.model).name}, residual, CAA S→T "
                        f"({len(source)} toxic → {len(target)} non-toxic)")
    for col in ("layer", "|sink|", "median |tok|", "ratio", "|v| old", "|v| new", "old/new",
                "cos(v_old,sink)", "cos(v_new,sink)", "cos(old,new)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["layer"]), f"{r['sink_norm']:.0f}", f"{r['median_token_norm']:.0f}",
                      f"{r['sink_to_median']:.1f}", f"{r['caa_norm_with_sink']:.1f}",
                      f"{r['caa_norm_sink_free']:.1f}", f"{r['norm_ratio_with_to_free']:.2f}",
                      f"{r['cos_with_sink_old']:+.3f}", f"{r['cos_with_sink_new']:+.3f}",
                      f"{r['cos_old_new']:+.3f}")
    console.print(table)
    console.print(f"mean tokens per text: source {len_s:.1f}, target {len_t:.1f}; first token "
                  f"ids {sorted(first_ids)}; load {load_s:.1f} s, two fits {fit_s:.1f} s")

    result = {
        "model": args.model,
        "model_type": model.config.model_type,
        "site": "residual",
        "n_source": len(source),
        "n_target": len(target),
        "sets": {"source": "toxic.txt", "target": "nontoxic.txt",
                 "made_by": f"scripts/toxicity_sets.py --n {args.n}"},
        "mean_tokens_source": len_s,
        "mean_tokens_target": len_t,
        "first_token_ids": sorted(first_ids),
        "fit_info_statistics": {"old": old.fit_info["statistics"],
                                "new": new.fit_info["statistics"]},
        "layers": rows,
        "seconds": {"load": load_s, "two_fits": fit_s},
        "machine": {"platform": platform.platform(), "threads": args.threads,
                    "torch": torch.__version__},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
