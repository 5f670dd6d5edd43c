"""Does llama.cpp, steered by an exported control vector, do what steerwise does?

On the reference real model: steerwise on the float32 Hugging Face directory (its hooks, every
position steered, the attention sink included) against llama.cpp (llama-cpp-python) on the
model's own Q4_K_M GGUF with the recipe exported by ``steerwise export --format llama.cpp``,
loaded as llama.cpp's ``common_control_vector_load`` loads it (``steerwise.export.llama_cpp_buffer``)
and set with ``llama_set_adapter_cvec`` over layers 1 .. n_layer.

Both backends get the same token ids (the HF tokenizer's, with BOS) and return the logits of every
position. Per strength it reports, over all positions of all prompts:

* top-1 agreement (HF vs llama.cpp) — unsteered it measures what the 4-bit quantization alone
  changes;
* mean KL(HF || llama.cpp) of the next-token distributions;
* the correlation of the *steering shifts* (steered − unsteered log-probabilities) of the two
  backends, and, of the positions where steering changes HF's top-1, the share where llama.cpp's
  steered top-1 is the same token;
* the same with the HF side leaving the first position (the attention sink) unsteered (the
  exported vectors added by plain hooks at positions 1..), since llama.cpp steers every position;
* the same for a deliberately wrong file (each vector moved one layer down: ``direction.N`` holds
  the vector of layer N + 1), to show the layer numbering is not a matter of indifference.

    python scripts/llama_cpp_parity.py [--hf DIR] [--gguf FILE] [--recipe DIR] [--out JSON]

Needs ``pip install llama-cpp-python`` (compiles llama.cpp: 42 min on 2 busy cores). Without
``--recipe`` it fits CAA without a gate on layers 1-17 from 32 + 32 RealToxicityPrompts texts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steerwise.export import (
    control_vector,
    export_recipe,
    llama_cpp_buffer,
    write_control_vector,
)
from steerwise.models import load_model
from steerwise.recipe import Recipe

CACHE = Path("/work/cache/gemma3-270m")
DATA = next((p for p in (ROOT.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()),
            ROOT.parent / "shared" / "data")
PROMPTS = [
    "The weather today is",
    "My favourite thing about the city is",
    "He told the reporters that the decision was",
    "You are such a",
    "The recipe calls for two cups of",
    "I can't believe those people would",
]


def read_jsonl(path: Path, n: int, skip: int = 0) -> list[str]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [r["prompt"] + r["continuation"] for r in rows[skip:skip + n]]


def hf_logprobs(model, ids: list[int], recipe: Recipe | None, strength: float) -> torch.Tensor:
    x = torch.tensor([ids])
    with torch.no_grad():
        if recipe is None or strength == 0:
            logits = model(input_ids=x).logits[0]
        else:
            with recipe.apply(model, strength):
                logits = model(input_ids=x).logits[0]
    return torch.log_softmax(logits.double(), -1)


def hf_logprobs_sink_unsteered(model, ids: list[int], directions: dict[int, np.ndarray]
                               ) -> torch.Tensor:
    """The exported vectors added to the layer outputs at every position but the first (the
    attention sink): what llama.cpp would give if it left the sink alone."""
    layers = model.model.layers

    def adder(vec):
        def add(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            out = torch.cat([out[:, :1], out[:, 1:] + vec], dim=1)
            return (out, *output[1:]) if isinstance(output, tuple) else out
        return add

    handles = [layers[n].register_forward_hook(adder(torch.from_numpy(v)))
               for n, v in directions.items()]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return torch.log_softmax(logits.double(), -1)


def set_cvec(llama_cpp, llm, data: np.ndarray | None, n_embd: int, n_layers: int) -> None:
    fn = (getattr(llama_cpp, "llama_set_adapter_cvec", None)
          or getattr(llama_cpp, "llama_apply_adapter_cvec", None)
          or llama_cpp.llama_control_vector_apply)
    if data is None:
        rc = fn(llm.ctx, None, 0, n_embd, 0, 0)
    else:
        buf = np.ascontiguousarray(data, dtype=np.float32)
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = fn(llm.ctx, ptr, buf.size, n_embd, 1, n_layers)
    if rc != 0:
        raise RuntimeError(f"{fn.__name__} returned {rc}")


def llama_logprobs(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    scores = np.array(llm.scores[: len(ids)], dtype=np.float64)
    return torch.log_softmax(torch.from_numpy(scores), -1)


def compare(hf0, hf1, ll0, ll1) -> dict[str, float]:
    """hf0/ll0 unsteered, hf1/ll1 steered log-probs, (positions, vocab) each."""
    top_hf, top_ll = hf1.argmax(-1), ll1.argmax(-1)
    kl = (hf1.exp() * (hf1 - ll1)).sum(-1)
    d_hf, d_ll = (hf1 - hf0).flatten(), (ll1 - ll0).flatten()
    keep = torch.isfinite(d_hf) & torch.isfinite(d_ll)
    corr = float(np.corrcoef(d_hf[keep].numpy(), d_ll[keep].numpy())[0, 1])
    changed = hf1.argmax(-1) != hf0.argmax(-1)
    return {
        "top1_agreement": float((top_hf == top_ll).double().mean()),
        "kl_hf_llama_mean": float(kl.mean()),
        "shift_correlation": corr,
        "positions_top1_changed_by_steering_hf": int(changed.sum()),
        "of_those_llama_same_top1": float((top_ll[changed] == top_hf[changed]).double().mean())
        if changed.any() else float("nan"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", default=str(CACHE / "hf"))
    ap.add_argument("--gguf", default=str(CACHE / "gemma-3-270m-Q4_K_M.gguf"))
    ap.add_argument("--recipe", default=None, help="a recipe directory (default: fit CAA)")
    ap.add_argument("--strengths", default="0.1,0.25,0.5,1", help="comma-separated strengths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/llama-cpp-parity.json"))
    args = ap.parse_args()
    import llama_cpp

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, tok = load_model(args.hf, dtype="float32")
    n_layers = model.config.get_text_config().num_hidden_layers
    if args.recipe:
        recipe = Recipe.from_pretrained(args.recipe)
    else:
        from steerwise.fit import fit

        toxic = read_jsonl(DATA / "rtp_toxic.jsonl", 32, skip=100)
        benign = read_jsonl(DATA / "rtp_nontoxic.jsonl", 32, skip=100)
        recipe = fit(model, tok, toxic, target=benign, method="caa", gate="none",
                     layers=f"1-{n_layers - 1}", default_strength=1.0, progress=False)
    fit_s = time.perf_counter() - t0
    # llama.cpp cannot steer layer 0's output: compare on the layers it can steer
    recipe = Recipe(recipe.model, [e for e in recipe.entries if e.site.layer > 0], recipe.method,
                    recipe.gate, recipe.default_strength, recipe.fit_info)
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=256, logits_all=True, n_threads=args.threads,
                          verbose=False, seed=0)
    hf_ids = [tok(p)["input_ids"] for p in PROMPTS]
    ll_ids = [llm.tokenize(p.encode(), add_bos=True, special=True) for p in PROMPTS]
    same_tokens = sum(a == b for a, b in zip(hf_ids, ll_ids))

    hf0 = torch.cat([hf_logprobs(model, ids, None, 0) for ids in hf_ids])
    set_cvec(llama_cpp, llm, None, 0, n_layers)
    ll0 = torch.cat([llama_logprobs(llm, ids) for ids in hf_ids])
    rows = [{"strength": 0.0, "top1_agreement": float((hf0.argmax(-1) == ll0.argmax(-1)).double().mean()),
             "kl_hf_llama_mean": float((hf0.exp() * (hf0 - ll0)).sum(-1).mean())}]
    with tempfile.TemporaryDirectory() as tmp:
        for s in [float(x) for x in args.strengths.split(",")]:
            path = export_recipe(recipe, Path(tmp) / "v.gguf", strength=s, drop_layer_0=True)
            n_embd, data = llama_cpp_buffer([(path, 1.0)], n_layers)
            hf1 = torch.cat([hf_logprobs(model, ids, recipe, s) for ids in hf_ids])
            set_cvec(llama_cpp, llm, data, n_embd, n_layers)
            ll1 = torch.cat([llama_logprobs(llm, ids) for ids in hf_ids])
            # the same vectors one layer down (direction.N = the vector of layer N + 1)
            cv = control_vector(recipe, s, drop_layer_0=True)
            hfn = torch.cat([hf_logprobs_sink_unsteered(model, ids, cv.directions)
                             for ids in hf_ids])
            cv.directions = {n - 1: v for n, v in cv.directions.items() if n - 1 >= 1}
            wrong = write_control_vector(cv, Path(tmp) / "wrong.gguf")
            _, wdata = llama_cpp_buffer([(wrong, 1.0)], n_layers)
            set_cvec(llama_cpp, llm, wdata, n_embd, n_layers)
            llw = torch.cat([llama_logprobs(llm, ids) for ids in hf_ids])
            set_cvec(llama_cpp, llm, None, n_embd, n_layers)
            # the scale of --control-vector-scaled: the strength-1 file scaled by s
            one = export_recipe(recipe, Path(tmp) / "one.gguf", strength=1.0, drop_layer_0=True)
            _, sdata = llama_cpp_buffer([(one, s)], n_layers)
            row = {"strength": s, **compare(hf0, hf1, ll0, ll1),
                   "wrong_layer_numbering": compare(hf0, hf1, ll0, llw),
                   "hf_sink_unsteered_vs_llama": compare(hf0, hfn, ll0, ll1),
                   "scaled_file_max_abs_diff": float(np.abs(sdata - data).max())}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "model_hf": args.hf, "model_gguf": args.gguf,
        "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
        "recipe": {"method": recipe.method, "gate": recipe.gate,
                   "sites": [e.site.name for e in recipe.entries],
                   "fit": "given" if args.recipe else "32 toxic + 32 non-toxic RTP texts"},
        "prompts": PROMPTS, "positions": int(hf0.shape[0]),
        "tokenizations_equal": f"{same_tokens}/{len(PROMPTS)}",
        "hf_steers_sink": True,
        "rows": rows, "seconds": time.perf_counter() - t0, "fit_seconds": fit_s,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
