"""Generation overhead of steering, and fit time, measured side by side in one run.

    python benchmarks/bench_overhead.py [--repeats 5] [--tokens 64] [--skip-testbed]

Models: a GPT-2-small-shaped random model (12 layers, d = 768, built from a config) and, when
../shared is present, the testbed tox-qwen2-7m. For batch 1 and 8, greedy generation of
``--tokens`` new tokens: unsteered, CAA on all residual layers (no gate), CAA + DSAS on all
layers. Configurations run in rotating order within each repeat; the table shows medians and
ratios to unsteered. Fit time: ``fit(method="caa", gate="dsas")`` on all layers against one
no-grad forward pass over the same texts (both models, with the testbed's tokenizer; needs
../shared). Writes benchmarks/results/overhead.json.
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
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.activations import ensure_pad_token, forward_kwargs, pad_batch, tokenize  # noqa: E402
from steerwise.fit import fit  # noqa: E402
from steerwise.gates import DSASGate  # noqa: E402
from steerwise.hooks import SiteSteering  # noqa: E402
from steerwise.maps import CAAMap  # noqa: E402
from steerwise.recipe import ModelIdentity, Recipe  # noqa: E402
from steerwise.sites import hidden_size, resolve_sites  # noqa: E402

TESTBED = ROOT.parent / "shared" / "testbed" / "tox-qwen2-7m"
DATA = ROOT.parent / "shared" / "data"
console = Console()


def random_recipes(model) -> dict[str, Recipe]:
    g = torch.Generator().manual_seed(0)
    d = hidden_size(model)
    sites = resolve_sites(model, "residual")
    out = {}
    for gated in (False, True):
        entries = [
            SiteSteering(s, CAAMap(torch.randn(d, generator=g) * 0.1),
                         DSASGate(torch.randn(d, generator=g) * 0.01, torch.zeros(())) if gated else None)
            for s in sites
        ]
        out["CAA + DSAS" if gated else "CAA"] = Recipe(
            ModelIdentity.of(model), entries, "caa", "dsas" if gated else "none")
    return out


def time_generation(model, input_ids, mask, recipe, strength, tokens) -> float:
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens,
                  min_new_tokens=tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if recipe is None:
            t0 = time.perf_counter()
            model.generate(**kwargs)
            return time.perf_counter() - t0
        with recipe.apply(model, strength):
            t0 = time.perf_counter()
            model.generate(**kwargs)
            return time.perf_counter() - t0


def bench_generation(name, model, recipes, repeats, tokens, prompt_len=16) -> list[dict]:
    rows = []
    vocab = model.config.vocab_size
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
        mask = torch.ones_like(ids)
        configs = {"unsteered": None, **recipes}
        times: dict[str, list[float]] = {k: [] for k in configs}
        time_generation(model, ids, mask, None, 1.0, 4)  # warm-up
        order = list(configs)
        for r in range(repeats):
            rot = order[r % len(order):] + order[: r % len(order)]
            for k in rot:
                times[k].append(time_generation(model, ids, mask, configs[k], 1.0, tokens))
        base = statistics.median(times["unsteered"])
        for k, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(model=name, batch=batch, config=k, median_s=med,
                             ratio=med / base, runs=ts))
    return rows


def bench_fit(name, model, tok, source, control, repeats) -> dict:
    ensure_pad_token(tok)
    texts = source + control
    rows = tokenize(tok, texts, 128)

    def forward_all():
        with torch.no_grad():
            for i in range(0, len(rows), 16):
                ids, mask = pad_batch(rows[i:i + 16], tok.pad_token_id, torch.device("cpu"))
                model(**forward_kwargs(model, ids, mask), use_cache=False)

    fwd, fits = [], []
    for r in range(repeats):
        for k in (["fwd", "fit"] if r % 2 == 0 else ["fit", "fwd"]):
            t0 = time.perf_counter()
            if k == "fwd":
                forward_all()
                fwd.append(time.perf_counter() - t0)
            else:
                fit(model, tok, source, control, method="caa", gate="dsas", progress=False)
                fits.append(time.perf_counter() - t0)
    f, p = statistics.median(fits), statistics.median(fwd)
    return dict(model=name, n_texts=len(texts), fit_s=f, forward_s=p, ratio=f / p)


def gpt2_small():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt2", n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    return AutoModelForCausalLM.from_config(cfg).eval()


def fit_texts(n: int = 32) -> tuple[list[str], list[str]]:
    if DATA.is_dir():
        rows = [json.loads(x) for x in (DATA / "davidson_tweets.jsonl").open()]
        rnd = random.Random(0)
        tox = [r["text"] for r in rows if r["label"] != "neither"]
        neu = [r["text"] for r in rows if r["label"] == "neither"]
        return rnd.sample(tox, n), rnd.sample(neu, n)
    rnd = random.Random(0)
    words = "the of and a to in is was it for on with as by at from".split()
    return ([" ".join(rnd.choices(words, k=20)) for _ in range(n)],
            [" ".join(rnd.choices(words[::-1], k=20)) for _ in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-testbed", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    models = [("gpt2-small-random", gpt2_small(), None)]
    if TESTBED.is_dir() and not args.skip_testbed:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(TESTBED)
        # the random GPT-2 gets the testbed's tokenizer (8,192 ids < 50,257) for the fit timing
        models = [("gpt2-small-random", models[0][1], tok),
                  ("tox-qwen2-7m", AutoModelForCausalLM.from_pretrained(TESTBED).eval(), tok)]
    gen_rows, fit_rows = [], []
    source, control = fit_texts()
    for name, model, tok in models:
        console.print(f"[bold]{name}[/]: generation")
        gen_rows += bench_generation(name, model, random_recipes(model), args.repeats, args.tokens)
        if tok is not None:
            console.print(f"[bold]{name}[/]: fit")
            fit_rows.append(bench_fit(name, model, tok, source, control, args.repeats))

    table = Table(title=f"greedy generation of {args.tokens} tokens, median of {args.repeats}")
    for col in ("model", "batch", "config", "median s", "× unsteered"):
        table.add_column(col)
    for r in gen_rows:
        table.add_row(r["model"], str(r["batch"]), r["config"], f"{r['median_s']:.3f}",
                      f"{r['ratio']:.3f}")
    console.print(table)
    if fit_rows:
        table = Table(title="fit CAA + DSAS (all layers) vs one no-grad forward over the fit texts")
        for col in ("model", "texts", "fit s", "forward s", "ratio"):
            table.add_column(col)
        for r in fit_rows:
            table.add_row(r["model"], str(r["n_texts"]), f"{r['fit_s']:.2f}",
                          f"{r['forward_s']:.2f}", f"{r['ratio']:.2f}")
        console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        generation=gen_rows, fit=fit_rows, tokens=args.tokens, repeats=args.repeats,
        threads=args.threads, torch=torch.__version__, machine=platform.processor() or platform.machine(),
    ), indent=2))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
