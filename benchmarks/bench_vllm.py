"""vLLM throughput: unsteered vs steered (DSAS on 1 layer, on all layers), eager and compiled.

    python benchmarks/bench_vllm.py [--model DIR] [--prompts 32] [--tokens 128] [--repeats 5]

Per mode (eager, compiled) it starts two engines side by side: vanilla vLLM, and vLLM with two
steerwise recipes loaded (CAA + DSAS on the residual stream of the middle layer, and of every
layer). It times, in rotating order, the same batch on the vanilla engine and on the steered one
unsteered (strength 0: hooks run, nothing changes), steered with the 1-layer recipe and with the
all-layer recipe.
Throughput is generated tokens per second (greedy, ``ignore_eos``); ratios are each median
against the vanilla engine's median, and each best run against vanilla's best. The recipes are random (the cost of the branch-free kernel
does not depend on the values), built from the model's config, so any model vLLM serves works:
the script runs unchanged on a GPU machine (``--model Qwen/Qwen2.5-1.5B-Instruct`` there).
Writes ``benchmarks/results/vllm.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEERWISE_SHARED", ROOT.parent / "shared"))
TESTBED = SHARED / "testbed" / "tox-qwen2-7m"


def random_recipes(model_dir: str, out: Path, seed: int = 0) -> dict[str, Path]:
    """CAA + DSAS recipes on one middle layer and on all layers, for the model's architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from steerwise.gates import DSASGate
    from steerwise.hooks import SiteSteering
    from steerwise.maps import CAAMap
    from steerwise.recipe import ModelIdentity, Recipe
    from steerwise.sites import resolve_sites

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    ident = ModelIdentity.of(meta)
    d, n = ident.hidden_size, ident.num_layers
    g = torch.Generator().manual_seed(seed)
    paths = {}
    for name, layers in (("one", [n // 2]), ("all", list(range(n)))):
        entries = [
            SiteSteering(s, CAAMap(torch.randn(d, generator=g) * 0.1),
                         DSASGate(torch.randn(d, generator=g) / d ** 0.5, torch.zeros(())), 1.0)
            for s in resolve_sites(meta, "residual", layers)
        ]
        paths[name] = Recipe(ident, entries, "caa", "dsas", 1.0).save_pretrained(out / name)
    return paths


def random_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``length`` random token ids in [10, vocab)."""
    rnd = random.Random(seed)
    return [[rnd.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def make_engine(model: str, recipes: dict[str, Path] | None, eager: bool, args):
    from vllm import LLM

    import steerwise.vllm as sv

    # vLLM 0.32 picks Model Runner V2 wherever Triton is installed (so on CUDA, config/vllm.py,
    # use_v2_model_runner); steerwise.vllm needs the V1 runner, and vanilla gets the same runner
    os.environ.setdefault(sv.ENV_V2_RUNNER, "0")
    extra = sv.engine_args({k: str(v) for k, v in recipes.items()}) if recipes else {}
    kw = {"enforce_eager": eager, "seed": 0, "max_model_len": args.prompt_len + args.tokens + 8,
          "max_num_seqs": args.prompts, "enable_prefix_caching": False, "dtype": args.dtype}
    if args.kv_cache_bytes:
        kw["kv_cache_memory_bytes"] = args.kv_cache_bytes
    else:  # two engines share the GPU
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization
    return LLM(model, **kw, **extra)


def close(llm) -> None:
    import steerwise.vllm as sv

    sv.shutdown(llm)
    del llm
    gc.collect()


def timed(llm, prompts, recipe: str | None, strength: float, tokens: int) -> float:
    from vllm import SamplingParams

    import steerwise.vllm as sv

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True,
                            extra_args=sv.steering_args(recipe, strength))
    batch = [sv.steered_prompt({"prompt_token_ids": p}, recipe, strength) for p in prompts]
    t0 = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return n / dt


def compare(model: str, recipes: dict[str, Path], eager: bool, prompts: list[list[int]], args,
            deadline: float | None = None) -> dict:
    """One mode: a vanilla and a steered engine alive side by side, the cases (vanilla, strength
    0, 1 layer, all layers) timed in rotating order; tok/s per run, the ratios and each engine's
    start time. ``deadline`` (``time.monotonic()``): no new round of repeats that would end
    after it (at least one round runs)."""
    # both engines alive, cases in rotating order: the machine's load drifts over minutes
    starts: dict[str, float] = {}
    engines: dict = {}
    try:
        for eng, rec in (("vanilla", None), ("steered", recipes)):
            t0 = time.monotonic()
            engines[eng] = make_engine(model, rec, eager, args)
            starts[eng] = time.monotonic() - t0
        cases = [("vanilla", "vanilla", None, 0.0), ("strength 0", "steered", "one", 0.0),
                 ("1 layer", "steered", "one", args.strength),
                 ("all layers", "steered", "all", args.strength)]
        runs: dict[str, list[float]] = {label: [] for label, *_ in cases}
        for _, eng, name, s in cases:  # warm-up
            timed(engines[eng], prompts, name, s, args.tokens)
        for r in range(args.repeats):
            t0 = time.monotonic()
            for label, eng, name, s in cases[r % 4:] + cases[: r % 4]:
                runs[label].append(timed(engines[eng], prompts, name, s, args.tokens))
            if deadline is not None and time.monotonic() + (time.monotonic() - t0) > deadline:
                break
    finally:
        for llm in engines.values():
            close(llm)
    base = statistics.median(runs["vanilla"])
    return {**{f"{k}_tok_s": v for k, v in runs.items()},
            "throughput_ratio": {k: statistics.median(v) / base
                                 for k, v in runs.items() if k != "vanilla"},
            # best run of each: the least disturbed by other load on the machine
            "best_ratio": {k: max(v) / max(runs["vanilla"])
                           for k, v in runs.items() if k != "vanilla"},
            "engine_start_s": starts}


def summary(mode: str, res: dict) -> str:
    """One line: vanilla's median tok/s, then each case's median, ratio and best ratio."""
    runs = {k[: -len("_tok_s")]: v for k, v in res.items() if k.endswith("_tok_s")}
    base = statistics.median(runs["vanilla"])
    return f"{mode}: vanilla {base:.1f} tok/s (median); " + "; ".join(
        f"{k} {statistics.median(v):.1f} tok/s ({res['throughput_ratio'][k]:.3f}x, "
        f"best {res['best_ratio'][k]:.3f}x)" for k, v in runs.items() if k != "vanilla")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(TESTBED))
    ap.add_argument("--prompts", type=int, default=32, help="requests per timed batch")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--strength", type=float, default=4.0)
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-bytes", type=int, default=None,
                    help="vLLM kv_cache_memory_bytes (CPU: e.g. 1073741824)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                    help="per engine (two engines run side by side)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vllm.json"))
    args = ap.parse_args()

    import torch
    import vllm
    from transformers import AutoConfig

    on_gpu = torch.cuda.is_available()
    if not on_gpu and args.kv_cache_bytes is None:
        args.kv_cache_bytes = 1 << 30
    vocab = AutoConfig.from_pretrained(args.model).vocab_size
    prompts = random_prompts(vocab, args.prompts, args.prompt_len)
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    recipes = random_recipes(args.model, tmp)
    results: dict[str, dict] = {}
    for mode in args.modes.split(","):
        results[mode] = compare(args.model, recipes, mode == "eager", prompts, args)
        print(summary(mode, results[mode]), flush=True)
    report = {
        "command": "python benchmarks/bench_vllm.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k not in ("out",) and v is not None),
        "model": args.model, "device": device_name(),
        "vllm": vllm.__version__, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "prompts": args.prompts, "prompt_len": args.prompt_len,
        "tokens": args.tokens, "repeats": args.repeats, "strength": args.strength,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
