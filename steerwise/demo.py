"""``steerwise demo``: the DSAS paper's Figure-1 idea on the embedded concept-world model.

A CAA vector fitted to induce the word "pear" (fruit sentences without pear → fruit sentences
with pear) is applied two ways: uniformly (vanilla CAA) and gated by DSAS (per-layer classifiers
fruit context vs other topics). Vanilla CAA pushes "pear" into every continuation; CAA + DSAS
mostly only into fruit contexts. The demo prints examples side by side with the gate value of
every token, and the measured share of continuations that mention "pear" over many prompts.
Runs offline; about 1.4 CPU-minutes on 2 CPU cores (see the README's timing table).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from .cli import colour_terminal, finite_float, gate_numbers, positive_int
from .fit import fit
from .generate import generate
from .models import DEFAULT_MODEL, load_model
from .recipe import Recipe
from .tasks import concepts

console = Console()
WORD = "pear"


@dataclass
class DemoResult:
    """Share of continuations mentioning the word, per steering, strength and prompt group."""

    rates: dict[tuple[str, float], dict[str, float]]  # (steering, strength) → group → rate
    n_prompts: dict[str, int]
    strengths: tuple[float, ...]
    gate_accuracy: list[float]


def mentions(text: str, word: str = WORD) -> bool:
    return re.search(rf"\b{re.escape(word)}s?\b", text.lower()) is not None


def _rate(model, tok, prompts, recipe, strength, seeds, max_new_tokens, bar=None) -> float:
    hits = total = 0
    for seed in seeds:
        out = generate(model, tok, prompts, recipe, strength, max_new_tokens=max_new_tokens,
                       seed=seed, do_sample=True, top_p=0.9)
        hits += sum(mentions(t) for t in out.continuations)
        total += len(out.continuations)
        if bar is not None:
            bar.update(len(prompts))
    return hits / total


def run_demo(
    model_name: str = DEFAULT_MODEL,
    *,
    strength: float = 5.0,
    strengths: tuple[float, ...] = (3.0, 5.0, 7.0),
    n_fit: int = 32,
    n_prompts: int = 10,
    seeds: tuple[int, ...] = (0, 1, 2),
    max_new_tokens: int = 12,
    layers: str | None = None,
    html: str | None = None,
    show: bool = True,
) -> DemoResult:
    if n_prompts < 1 or n_fit < 1 or not seeds:
        raise ValueError("the demo needs n_prompts >= 1, n_fit >= 1 and at least one seed")
    if not all(map(math.isfinite, (strength, *strengths))):
        raise ValueError(f"strengths must be finite numbers: {strength}, {list(strengths)}")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.time()
    model, tok = load_model(model_name, device="cpu")
    sets = concepts.demo_sets(n_fit, seed=0)
    # the demo steers at the strengths it is given: no default strength is searched
    common = {"site": "residual", "layers": layers, "progress": False, "default_strength": 1.0}
    vanilla = fit(model, tok, sets["source"], sets["control"], sets["target"], gate="none", **common)
    gated = fit(model, tok, sets["source"], sets["control"], sets["target"], gate="dsas", **common)
    accs = [e.diagnostics["gate_accuracy"] for e in gated.entries]
    prompts = concepts.demo_prompts(seed=0, n_per_topic=n_prompts)
    groups = {
        "fruit prompts": prompts["fruit"],
        "other prompts": [p for topic, ps in prompts.items() if topic != "fruit" for p in ps],
    }
    steerings: dict[str, Recipe] = {"CAA": vanilla, "CAA + DSAS": gated}
    if show:
        console.rule("[bold]steerwise demo: inducing 'pear' — everywhere, or only where it fits")
        console.print(
            f"model: {model_name} · fit on {n_fit} fruit-without-pear (source), {n_fit} "
            f"fruit-with-pear (target), {n_fit} other-topic (control) sentences · examples at "
            f"strength {strength}"
        )
        table = Table(title="DSAS gate accuracy per layer (fruit vs other, 5-fold CV)")
        for e in gated.entries:
            table.add_column(e.site.name, justify="right")
        table.add_row(*[f"{a:.2f}" for a in accs])
        console.print(table)
        _show_examples(model, tok, groups, vanilla, gated, strength, html)
    runs = [("unsteered", 0.0, None)] + [(n, lam, r) for lam in strengths for n, r in steerings.items()]
    total = len(runs) * len(seeds) * sum(len(ps) for ps in groups.values())
    rates: dict[tuple[str, float], dict[str, float]] = {}
    with tqdm(total=total, desc="measuring", unit="continuation", disable=not show,
              leave=False) as bar:
        for name, lam, recipe in runs:
            bar.set_postfix_str(f"{name} λ={lam:g}")
            rates[(name, lam)] = {
                g: _rate(model, tok, ps, recipe, lam, seeds, max_new_tokens, bar)
                for g, ps in groups.items()
            }
    result = DemoResult(rates, {g: len(p) * len(seeds) for g, p in groups.items()},
                        tuple(strengths), accs)
    if show:
        table = Table(title=f"share of sampled continuations that mention '{WORD}'")
        table.add_column("steering")
        table.add_column("strength", justify="right")
        for g in groups:
            table.add_column(f"{g} (n={result.n_prompts[g]})", justify="right")
        for (name, lam), by_group in rates.items():
            table.add_row(name, f"{lam:g}", *[f"{100 * r:.0f} %" for r in by_group.values()])
        console.print(table)
        console.print(
            "Vanilla CAA puts the word everywhere; the DSAS gate keeps it to fruit contexts, "
            f"where the per-token gate is high. ({time.time() - t0:.0f} s)"
        )
    return result


def _show_examples(model, tok, groups, vanilla, gated, strength, html) -> None:
    examples = [groups["fruit prompts"][0], groups["other prompts"][0],
                groups["other prompts"][len(groups["other prompts"]) // 2]]
    base = generate(model, tok, examples, None, max_new_tokens=10)
    caa = generate(model, tok, examples, vanilla, strength, max_new_tokens=10)
    dsas = generate(model, tok, examples, gated, strength, max_new_tokens=10, explain=True)
    for i, prompt in enumerate(examples):
        console.print(f"\n[bold]{prompt}[/] …")
        console.print(f"  [dim]unsteered :[/] {base.continuations[i]}")
        console.print(f"  [dim]CAA       :[/] {caa.continuations[i]}")
        console.print(f"  [dim]CAA + DSAS:[/] {dsas.continuations[i]}")
        if colour_terminal(console):
            console.print("  [dim]gate (mean over layers, red = steered):[/] ", end="")
            console.print(dsas.trace.to_rich(i))  # type: ignore[union-attr]
        else:
            console.print("  " + gate_numbers(dsas.trace, i), soft_wrap=True, highlight=False,
                          markup=False)
    if html and dsas.trace is not None:
        path = dsas.trace.save_html(html, title="steerwise demo: DSAS gate values")
        console.print(f"\ngate heat map (tokens × layers) written to {path}")


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.model, strength=args.strength, strengths=tuple(args.strengths),
             n_fit=args.n_fit, n_prompts=args.n_prompts, seeds=tuple(range(args.seeds)),
             html=args.html)
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="offline demo: CAA vs CAA + DSAS on the embedded model")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a model trained on the concept world (the demo's prompts and sets are "
                        "in its vocabulary)")
    p.add_argument("--strength", type=finite_float, default=5.0, help="strength of the examples")
    p.add_argument("--strengths", type=finite_float, nargs="+", default=[3.0, 5.0, 7.0],
                   help="strengths of the measured table")
    p.add_argument("--n-fit", type=positive_int, default=32, help="examples per fitting set")
    p.add_argument("--n-prompts", type=positive_int, default=10, help="prompts per topic")
    p.add_argument("--seeds", type=positive_int, default=3, help="sampling seeds per prompt")
    p.add_argument("--html", default=None, help="also write the gate heat map to this HTML file")
    p.set_defaults(func=_cmd_demo)
