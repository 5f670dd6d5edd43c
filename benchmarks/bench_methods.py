"""Fit time of every steering method and generation overhead of every map × gate, in one run.

    python benchmarks/bench_methods.py [--repeats 3] [--tokens 32] [--threads 2]

On the testbed ../shared/testbed/tox-qwen2-7m (6 layers, d = 256) with 32 source texts (Davidson
tweets labelled offensive/hate), 32 target texts (tweets labelled neither) and 32 control texts
(WikiText-2 sentences from training articles), picked like scripts/toxicity_sets.py does:

1. **Fit time**, residual stream of all layers: each method with no gate (LinEAS: 1,000 steps,
   batch 4, the defaults), ITI per head (site ``heads``), and CAA with each gate (the gate's cost
   is the difference to CAA + none); E2E-DSAS as LinEAS + e2e (1,000 steps). Every fit includes
   collecting the activations and the per-site probe/gate diagnostics.
2. **Generation overhead**: greedy generation of ``--tokens`` new tokens for a left-padded batch
   of 8 held-out toxic prompts, unsteered and with each of the 5 maps × 5 gates on all layers;
   configurations run in rotating order within each repeat; medians and ratios to unsteered.
   The map × gate recipes combine each method's fitted maps with each gate kind's fitted gates
   (same tensors and hooks as a direct fit; the cost of a hook does not depend on the fitted
   values). For e2e gates on maps other than LinEAS the gates come from a short E2E fit
   (``--e2e-steps``) of that map, since training length does not change inference cost.

Writes benchmarks/results/methods.json. Needs ../shared (exits with a message otherwise).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from steerwise.activations import pad_batch, tokenize  # noqa: E402
from steerwise.fit import GATES, FitOptions, fit  # noqa: E402
from steerwise.hooks import SiteSteering  # noqa: E402
from steerwise.maps.lineas import LinEASOptions  # noqa: E402
from steerwise.recipe import Recipe  # noqa: E402

SHARED = ROOT.parent / "shared"
TESTBED = SHARED / "testbed" / "tox-qwen2-7m"
DATA = SHARED / "data"
METHODS = ("caa", "iti", "mean-act", "linear-act", "lineas")
console = Console()


def fitting_sets(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(toxic source, non-toxic target, neutral control), as scripts/toxicity_sets.py picks them."""
    from toxicity_sets import wikitext_sentences

    rnd = random.Random(seed)
    tweets = [json.loads(line) for line in (DATA / "davidson_tweets.jsonl").open()]
    clean = [t for t in tweets if 5 <= len(t["text"].split()) <= 40]
    toxic = [t["text"] for t in clean if t["label"] in ("offensive", "hate")]
    nontoxic = [t["text"] for t in clean if t["label"] == "neither"]
    neutral = wikitext_sentences(DATA / "wikitext2_test.txt")
    return tuple(  # type: ignore[return-value]
        [" ".join(r.split()) for r in rnd.sample(pool, n)] for pool in (toxic, nontoxic, neutral)
    )


def held_out_toxic_prompts(n: int) -> list[str]:
    rows = [json.loads(line) for line in (DATA / "rtp_toxic.jsonl").open()]
    return [rows[i]["prompt"] for i in range(1, 2 * n, 2)]  # odd rows: never seen in training


def timed_fit(model, tok, sets, **kw) -> tuple[Recipe, float]:
    source, target, control = sets
    t0 = time.perf_counter()
    kw.setdefault("default_strength", 1.0)  # the maps and gates only: no strength search
    recipe = fit(model, tok, source, control, target, FitOptions(**kw), progress=False)
    return recipe, time.perf_counter() - t0


def compose(map_recipe: Recipe, gate_recipe: Recipe) -> Recipe:
    """The maps of one recipe with the gates (and layer scales) of another, site by site."""
    gates = {e.site.name: e for e in gate_recipe.entries}
    entries = []
    for e in map_recipe.entries:
        g = gates[e.site.name]
        entries.append(SiteSteering(e.site, e.map, g.gate, g.scale, {**e.diagnostics}))
    return Recipe(map_recipe.model, entries, map_recipe.method, gate_recipe.gate,
                  map_recipe.default_strength)


def time_generation(model, ids, mask, recipe, tokens) -> float:
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=tokens,
                  min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if recipe is None:
            t0 = time.perf_counter()
            model.generate(**kwargs)
            return time.perf_counter() - t0
        with recipe.apply(model, 1.0):
            t0 = time.perf_counter()
            model.generate(**kwargs)
            return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=32, help="texts per set")
    ap.add_argument("--steps", type=int, default=1000, help="LinEAS / E2E-DSAS training steps")
    ap.add_argument("--e2e-steps", type=int, default=50,
                    help="E2E steps for the gates of non-LinEAS maps (overhead only)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods.json"))
    args = ap.parse_args()
    if not TESTBED.is_dir() or not DATA.is_dir():
        sys.exit(f"needs the testbed and data under {SHARED} (dev machines and CI only)")
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=args.threads)  # scikit-learn's BLAS too, for an honest thread count
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TESTBED).eval()
    tok = AutoTokenizer.from_pretrained(TESTBED)
    sets = fitting_sets(args.n)
    lineas = LinEASOptions(steps=args.steps)

    # ---- fit times -----------------------------------------------------------------------------
    fit_rows, recipes = [], {}
    plan = [(m, "none", "residual") for m in METHODS] + [("iti", "none", "heads")]
    plan += [("caa", g, "residual") for g in GATES if g not in ("none", "e2e")]
    plan += [("lineas", "e2e", "residual")]
    for method, gate, site in plan:
        console.print(f"fit {method} + {gate} ({site}) ...")
        recipe, secs = timed_fit(model, tok, sets, method=method, gate=gate, site=site,
                                 lineas=LinEASOptions(**lineas.to_json()))
        recipes[(method, gate, site)] = recipe
        row = dict(method=method, gate=gate, site=site, layers=len(recipe.entries), fit_s=secs)
        train = recipe.fit_info.get("training")
        if train:
            row.update(steps=train["steps"], train_s=train["seconds"],
                       w2_initial=train["w2_initial"], w2_final=train["w2_final"])
        gs = [d for d in recipe.diagnostics() if "gate_mean_source" in d]
        if gs:
            row["gate_mean_source"] = statistics.mean(d["gate_mean_source"] for d in gs)
            row["gate_mean_control"] = statistics.mean(d["gate_mean_control"] for d in gs)
        if "map" in recipe.fit_info:
            row["map"] = recipe.fit_info["map"]
        row["diagnostics"] = recipe.diagnostics()
        fit_rows.append(row)
    base_caa = next(r["fit_s"] for r in fit_rows if r["method"] == "caa" and r["gate"] == "none")
    for r in fit_rows:
        if r["method"] == "caa" and r["gate"] != "none":
            r["gate_cost_s"] = r["fit_s"] - base_caa

    # ---- recipes for every map x gate ----------------------------------------------------------
    combos: dict[str, Recipe] = {}
    for method in METHODS:
        maps = recipes[(method, "none", "residual")]
        for gate in GATES:
            if gate == "none":
                combos[f"{method} + none"] = maps
            elif gate == "e2e" and method == "lineas":
                combos["lineas + e2e"] = recipes[("lineas", "e2e", "residual")]
            elif gate == "e2e":
                console.print(f"fit {method} + e2e ({args.e2e_steps} steps, overhead only) ...")
                combos[f"{method} + e2e"], _ = timed_fit(
                    model, tok, sets, method=method, gate="e2e",
                    lineas=LinEASOptions(steps=args.e2e_steps))
            else:
                combos[f"{method} + {gate}"] = compose(maps, recipes[("caa", gate, "residual")])

    # ---- generation overhead -------------------------------------------------------------------
    prompts = held_out_toxic_prompts(8)
    rows = tokenize(tok, prompts, 96)
    ids, mask = pad_batch(rows, tok.pad_token_id, torch.device("cpu"))
    configs: dict[str, Recipe | None] = {"unsteered": None, **combos}
    times: dict[str, list[float]] = {k: [] for k in configs}
    time_generation(model, ids, mask, None, 4)  # warm-up
    order = list(configs)
    for r in range(args.repeats):
        console.print(f"generation repeat {r + 1}/{args.repeats} ...")
        shift = (r * 7) % len(order)
        for k in order[shift:] + order[:shift]:
            times[k].append(time_generation(model, ids, mask, configs[k], args.tokens))
    base = statistics.median(times["unsteered"])
    gen_rows = [dict(config=k, median_s=statistics.median(ts),
                     ratio=statistics.median(ts) / base, runs=ts) for k, ts in times.items()]

    # ---- report --------------------------------------------------------------------------------
    table = Table(title=f"fit time on tox-qwen2-7m, all {fit_rows[0]['layers']} layers, "
                        f"{args.n}+{args.n}+{args.n} texts, {args.threads} threads")
    for col in ("method", "gate", "site", "fit s", "notes"):
        table.add_column(col)
    for r in fit_rows:
        notes = []
        if "steps" in r:
            notes.append(f"{r['steps']} steps, W2 {r['w2_initial']:.3g}→{r['w2_final']:.3g}")
        if "gate_mean_source" in r:
            notes.append(f"mean gate S {r['gate_mean_source']:.2f} / C {r['gate_mean_control']:.2f}")
        if "gate_cost_s" in r:
            notes.append(f"gate ≈ {r['gate_cost_s']:+.2f} s over caa+none")
        if "map" in r:
            notes.append(f"top {r['map']['top_k_heads']} of {r['map']['heads_total']} heads")
        table.add_row(r["method"], r["gate"], r["site"], f"{r['fit_s']:.2f}", "; ".join(notes))
    console.print(table)
    table = Table(title=f"greedy generation, batch 8, {args.tokens} new tokens, "
                        f"median of {args.repeats}")
    table.add_column("map \\ gate")
    for g in GATES:
        table.add_column(g, justify="right")
    by = {r["config"]: r for r in gen_rows}
    for method in METHODS:
        table.add_row(method, *[f"{by[f'{method} + {g}']['ratio']:.2f}×" for g in GATES])
    console.print(table)
    console.print(f"unsteered: {base:.3f} s median")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        fit=fit_rows, generation=gen_rows, unsteered_s=base, tokens=args.tokens,
        repeats=args.repeats, threads=args.threads, n_per_set=args.n, steps=args.steps,
        e2e_steps_other_maps=args.e2e_steps, torch=torch.__version__,
        machine=platform.processor() or platform.machine(),
    ), indent=2, default=float))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
