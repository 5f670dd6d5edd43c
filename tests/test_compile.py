"""The compile step (steerwise.compile) and the position policy (steerwise.positions), on every
backend: HF hooks (left padding, KV cache), the server's joined batches, vLLM's token routing."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer, random_recipe
from safetensors.torch import load_file
from test_hooks import IDS, _generate, assert_padded_batch_equals_rows_alone, logits

from steerwise.activations import pad_batch
from steerwise.compile import HF_HOOKS, check_backend, compile_steering
from steerwise.identity import ModelIdentity, RecipeMismatchError, check_identity
from steerwise.positions import DEFAULT_FIRST_TOKEN, first_token_keep
from steerwise.recipe import CONFIG_NAME, Recipe, RecipeError, apply_recipes
from steerwise.steering import SiteSteering

DATA = Path(__file__).parent / "data"
OLD = DATA / "recipe-59ea37a"  # saved by steerwise at 59ea37a, before the position policy


def skipping(recipe: Recipe) -> Recipe:
    """The same steering with the first token left unsteered."""
    return Recipe(recipe.model, recipe.entries, recipe.method, recipe.gate,
                  recipe.default_strength, dict(recipe.fit_info), first_token="skip")


def out(model, ids, mask=None):
    """Logits (batch, tokens, vocab), positions counted per row. Causal: a position's logits are
    a function of its residual stream at every layer, so equal logits at the first token mean
    every layer left it alone. (Not ``output_hidden_states``: transformers records them with
    hooks of its own, which may run before or after the steering hooks.)"""
    pos = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


# ---- recipes saved before the policy -----------------------------------------------------------
def test_a_recipe_saved_before_the_policy_loads_as_steer_and_steers_identically(tmp_path):
    raw = json.loads((OLD / CONFIG_NAME).read_text())
    assert raw["format_version"] == 1 and "positions" not in raw
    recipe = Recipe.from_pretrained(OLD)
    assert recipe.first_token == "steer"
    expected = load_file(str(DATA / "recipe-59ea37a-expected.safetensors"))
    model = make_model("llama")
    ids, mask = expected["input_ids"], expected["attention_mask"]
    with recipe.apply(model, 1.5):
        steered = logits(model, ids, mask)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                 do_sample=False, pad_token_id=0)
    torch.testing.assert_close(steered, expected["steered_logits"], rtol=0, atol=1e-6)
    assert torch.equal(gen, expected["generated"])
    # saved again, it records its policy (format 2) and still steers the same
    again = Recipe.from_pretrained(recipe.save_pretrained(tmp_path / "again"))
    saved = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    assert saved["format_version"] == 2 and saved["positions"] == {"first_token": "steer"}
    with again.apply(model, 1.5):
        assert torch.equal(logits(model, ids, mask), steered)


def test_the_policy_round_trips_and_bad_values_name_the_field(tmp_path):
    model = make_model("qwen2")
    recipe = skipping(random_recipe(model))
    back = Recipe.from_pretrained(recipe.save_pretrained(tmp_path / "r"))
    assert back.first_token == "skip"
    for value, needle in (({"first_token": "never"}, r"positions\.first_token: must be one of"),
                          ({"first_tokn": "skip"}, "did you mean 'first_token'"),
                          ("skip", "positions: expected an object")):
        bad = shutil.copytree(tmp_path / "r", tmp_path / f"bad{len(needle)}")
        config = json.loads((bad / CONFIG_NAME).read_text())
        config["positions"] = value
        (bad / CONFIG_NAME).write_text(json.dumps(config))
        with pytest.raises(RecipeError, match=needle):
            Recipe.from_pretrained(bad)
    with pytest.raises(ValueError, match="first_token must be one of"):
        Recipe(recipe.model, recipe.entries, "caa", "dsas", first_token="maybe")


def test_fit_records_the_policy(tokenizer):
    from steerwise.fit import FitOptions, fit

    model = make_model("gpt2")
    src = ["the dog runs fast", "a cat sleeps in the sun", "the bird sings a song"] * 2
    tgt = ["the apple is sweet", "a ripe pear and banana", "green fruit is good"] * 2
    assert FitOptions().first_token == DEFAULT_FIRST_TOKEN
    recipe = fit(model, tokenizer, src, tgt, gate="none", layers="1", progress=False,
                 first_token="skip")
    assert recipe.first_token == "skip"
    assert recipe.fit_info["options"]["first_token"] == "skip"
    with pytest.raises(ValueError, match="first_token must be one of"):
        fit(model, tokenizer, src, tgt, gate="none", layers="1", progress=False,
            first_token="sometimes")


# ---- HF hooks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_skip_leaves_the_first_token_unsteered_and_steers_the_rest(family):
    model = make_model(family)
    recipe = random_recipe(model)
    ids = torch.tensor([IDS[0]])
    base = out(model, ids)
    with skipping(recipe).apply(model, 2.0):
        skipped = out(model, ids)
    with recipe.apply(model, 2.0):
        steered = out(model, ids)
    assert torch.equal(skipped[:, 0], base[:, 0])  # bit for bit
    assert not torch.allclose(steered[:, 0], base[:, 0])  # "steer" does steer it
    assert not torch.allclose(skipped[:, 1:], base[:, 1:], atol=1e-4)  # the rest is steered
    with skipping(recipe).apply(model, 0.0):  # strength 0 stays bit-identical
        assert torch.equal(out(model, ids), base)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skip_left_padded_rows_equal_rows_alone(family):
    model = make_model(family)
    recipe = skipping(random_recipe(model))
    assert_padded_batch_equals_rows_alone(model, recipe)
    ids, mask = pad_batch(IDS, 0, torch.device("cpu"))
    base = out(model, ids, mask)
    with recipe.apply(model, 1.5):
        got = out(model, ids, mask)
    first = mask.int().argmax(1)  # row 1 is left-padded: its first real token is not at 0
    assert first.tolist() == [0, 2]
    for r, f in enumerate(first.tolist()):
        assert torch.equal(got[r, f], base[r, f])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_skip_kv_cache_equals_recompute(family):
    model = make_model(family)
    recipe = skipping(random_recipe(model))
    ids = torch.tensor([IDS[0]])
    with recipe.apply(model, 1.5):
        seq, step_logits = _generate(model, ids, torch.ones_like(ids))
        full = logits(model, seq)
    torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)


def test_several_recipes_keep_their_own_policy_per_row():
    model = make_model("llama")
    steer = random_recipe(model, seed=1)
    skip = skipping(random_recipe(model, seed=2))
    ids, mask = pad_batch(IDS, 0, torch.device("cpu"))
    with apply_recipes(model, {"steer": steer, "skip": skip}) as handle:
        handle.route(["skip", "steer"], [2.0, 2.0])
        both = out(model, ids, mask)
        handle.route(["steer", "skip"], [2.0, 2.0])
        swapped = out(model, ids, mask)
    for r, recipe in enumerate((skip, steer)):
        one = torch.tensor([IDS[r]])
        with recipe.apply(model, 2.0):
            alone = out(model, one)
        torch.testing.assert_close(both[r, ids.shape[1] - one.shape[1]:], alone[0],
                                   rtol=1e-4, atol=1e-5)
    base = out(model, ids, mask)
    assert torch.equal(both[0, 0], base[0, 0])  # row 0 skips: its first token is plain
    assert not torch.allclose(swapped[0, 0], base[0, 0])  # routed to "steer": steered
    assert torch.equal(swapped[1, 2], base[1, 2])  # row 1's first real token, skipped


def test_gate_trace_shows_zero_at_a_skipped_first_token():
    model = make_model("llama")
    recipe = skipping(random_recipe(model))
    with recipe.apply(model, 1.0, trace=True) as handle:
        _generate(model, torch.tensor([IDS[0]]), torch.ones(1, 5, dtype=torch.long), n=2)
        _, values, _ = handle.gate_trace()
    assert torch.all(values[0, 0] == 0) and torch.all(values[0, 1:] != 0)


def test_the_steer_policy_adds_no_pre_hook():
    """No recipe skips: no root pre-hook, the same per-call work as before the policy."""
    model = make_model("llama")
    recipe = random_recipe(model, gated=False)
    with recipe.apply(model, 1.0):
        assert not model._forward_pre_hooks
    with skipping(recipe).apply(model, 1.0):
        assert model._forward_pre_hooks


def test_first_token_keep():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert first_token_keep(mask, 3, 4).tolist() == [[1, 1, 0, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert first_token_keep(None, 1, 3).tolist() == [[0, 1, 1]]


# ---- the compile step ----------------------------------------------------------------------------
def test_compile_groups_sites_and_records_policies():
    model = make_model("qwen2")
    a = random_recipe(model, seed=1)
    b = skipping(random_recipe(model, "mlp", gated=False, seed=2))
    compiled = compile_steering({"a": a, "b": b}, model)
    assert compiled.names == ["a", "b"] and compiled.first_token == ["steer", "skip"]
    assert compiled.skips_first and compiled.skip_first == [False, True]
    assert len(compiled.sites) == len(a.entries) + len(b.entries)
    for cs in compiled.sites:
        assert cs.stack.n_recipes == 2 and len(cs.recipes) == 1
    assert compiled.sites_of("b") == {e.site.name for e in b.entries}
    entries = list(a.entries)  # bare entries: no identity, every position steered
    assert compile_steering({"": entries}).first_token == ["steer"]
    with pytest.raises(ValueError, match="steers site 'residual.0' twice"):
        compile_steering({"x": entries + entries[:1]})


def test_one_identity_check_for_models_and_descriptions():
    model = make_model("qwen2")
    recipe = random_recipe(model)
    served = ModelIdentity(model_type="qwen2", hidden_size=32, num_layers=4)
    with pytest.raises(RecipeMismatchError, match=r"recipe 'r': .*fitted for another model.*"
                                                  r"4 layers \(recipe: 3\)"):
        compile_steering({"r": recipe}, served)
    with pytest.raises(RecipeMismatchError, match="model type 'llama'"):
        compile_steering({"r": recipe}, make_model("llama"))
    check_identity(recipe.model, ModelIdentity.of(model))  # a description or a model alike
    check_identity(recipe.model, model)


def test_one_refusal_for_every_backend():
    from steerwise.gates.cast import CASTGate
    from steerwise.server.engine import SERVER
    from steerwise.vllm.runtime import vllm_backend

    model = make_model("qwen2")
    plain = random_recipe(model)
    site = plain.entries[0].site
    cast = Recipe(plain.model, [SiteSteering(site, plain.entries[0].map,
                                             CASTGate("condition", vector=torch.ones(32)))],
                  "caa", "cast")
    compiled = compile_steering({"c": cast, "p": plain}, model)
    for backend, needle in ((SERVER, "the server cannot keep it per row"),
                            (vllm_backend("qwen2", 32), "steerwise.vllm does not run")):
        with pytest.raises(ValueError, match=f"recipe 'c' uses a 'cast' gate.*{needle}"):
            check_backend(compiled, backend)
    check_backend(compiled, HF_HOOKS)  # runs everything
    heads = random_recipe(model, "heads", gated=False)
    with pytest.raises(ValueError, match="recipe 'h', site 'heads.0'.*not supported in vLLM"):
        check_backend(compile_steering({"h": heads}), vllm_backend("qwen2", 32))


# ---- the server ----------------------------------------------------------------------------------
def test_server_rows_with_a_skipping_recipe_equal_rows_alone():
    pytest.importorskip("fastapi")
    from steerwise.server.engine import Engine, Job

    model = make_model("llama")
    recipes = {"skip": skipping(random_recipe(model, seed=4, scale=3.0)),
               "steer": random_recipe(model, seed=4, scale=3.0)}
    engine = Engine(model, make_tokenizer(), recipes, max_batch=4, max_queue=8)
    try:
        def job(prompt, recipe, done, n=8):
            return Job(prompt, n, lambda ev: ev.kind != "delta" and done.release(),
                       recipe=recipe, strength=2.0)

        rows = [([5, 9, 12, 7, 20], "skip"), ([30, 8, 11], "skip"), ([6, 7], "steer"),
                ([13, 14, 15, 16], "skip")]
        alone = []
        for prompt, name in rows:
            done = threading.Semaphore(0)
            j = job(prompt, name, done)
            engine.submit(j)
            assert done.acquire(timeout=60)
            alone.append(j.generated)
        done = threading.Semaphore(0)
        first = [job(p, n, done, 12) for p, n in rows[:2]]
        later = [job(p, n, done) for p, n in rows[2:]]
        with engine._cond:  # the first two rows are prefilled together (left-padded)
            for j in first:
                engine.submit(j)
        while not first[0].generated:  # ... and running when the others join
            threading.Event().wait(0.005)
        for j in later:
            engine.submit(j)
        for _ in rows:
            assert done.acquire(timeout=60)
        assert engine.stats["max_rows"] >= 3
        assert [j.generated[:8] for j in first] == alone[:2]
        assert [j.generated for j in later] == alone[2:]
    finally:
        engine.close()


# ---- vLLM's routing (pure torch: no vLLM needed) -------------------------------------------------
def test_vllm_fill_gives_strength_zero_to_first_tokens_of_skipping_recipes():
    from torch import nn

    from steerwise.vllm.runtime import VllmSteering

    class Layer(nn.Module):  # vLLM's decoder-layer contract: (hidden, residual) in and out
        def forward(self, h, r):
            return h, r

    hf = make_model("llama")
    toy = nn.Module()
    toy.model = nn.Module()
    toy.model.layers = nn.ModuleList([Layer() for _ in range(3)])
    recipes = {"steer": random_recipe(hf, seed=1), "skip": skipping(random_recipe(hf, seed=2))}
    steering = VllmSteering(toy, recipes, model_type="llama", hidden_size=32, num_layers=3,
                            max_tokens=16, device="cpu")
    try:
        assert steering.skips_first
        # requests: skip (new: 3 tokens), steer (new: 2), skip (decoding: 1), skip (new: 2)
        routes = [(1, 2.0), (0, 3.0), (1, 4.0), (1, 5.0)]
        steering.fill(routes, [3, 2, 1, 2], 10, computed=[0, 0, 7, 0])
        assert steering.state.strength[:10].tolist() == [0, 2, 2, 3, 3, 4, 0, 5, 0, 0]
        assert steering.state.index[:8].tolist() == [1, 1, 1, 0, 0, 1, 1, 1]
        with pytest.raises(ValueError, match="computed tokens"):
            steering.fill(routes, [3, 2, 1, 2], 10)
        # a chunked prefill's later chunk (computed > 0) has no first token
        steering.fill([(1, 2.0)], [4], 4, computed=[3])
        assert steering.state.strength[:4].tolist() == [2, 2, 2, 2]
    finally:
        steering.remove()
    only_steer = VllmSteering(toy, {"steer": recipes["steer"]}, model_type="llama",
                              hidden_size=32, num_layers=3, max_tokens=16, device="cpu")
    try:  # no recipe skips: computed is not needed (the worker does not read it)
        assert not only_steer.skips_first
        only_steer.fill([(0, 2.0)], [3], 4)
        assert only_steer.state.strength[:4].tolist() == [2, 2, 2, 0]
    finally:
        only_steer.remove()
