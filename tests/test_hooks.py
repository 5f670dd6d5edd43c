"""Invariants of steering hooks, on tiny random models of every tested family."""

import inspect

import pytest
import torch
from conftest import FAMILIES, make_model, random_recipe

from steerwise.activations import pad_batch
from steerwise.sites import Site, SiteError

IDS = [[5, 9, 12, 7, 20], [30, 8, 11]]


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_strength_zero_is_bit_identical_and_hooks_leave_no_trace(family):
    model = make_model(family)
    ids = torch.tensor([IDS[0]])
    base = logits(model, ids)
    recipe = random_recipe(model)
    with recipe.apply(model, 0.0):
        assert torch.equal(logits(model, ids), base)
    with recipe.apply(model, 2.0) as handle:
        steered = logits(model, ids)
        handle.strength = 0.0  # changeable per call, no refit
        assert torch.equal(logits(model, ids), base)
        handle.strength = 2.0
        assert torch.equal(logits(model, ids), steered)
    assert not torch.allclose(steered, base)
    assert torch.equal(logits(model, ids), base)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hooks_removed_when_body_raises(family):
    model = make_model(family)
    ids = torch.tensor([IDS[0]])
    base = logits(model, ids)
    with pytest.raises(RuntimeError, match="boom"), random_recipe(model).apply(model, 3.0):
        logits(model, ids)
        raise RuntimeError("boom")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("site", ["residual", "attn", "mlp", "heads"])
def test_every_site_kind_steers(family, site):
    model = make_model(family)
    ids = torch.tensor([IDS[0]])
    base = logits(model, ids)
    with random_recipe(model, site=site, gated=False).apply(model, 1.0):
        assert not torch.allclose(logits(model, ids), base, atol=1e-5)


def _generate(model, ids, mask, n=6):
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
        return_dict_in_generate=True, output_logits=True, pad_token_id=0,
    )
    return out.sequences, torch.stack(out.logits, 1).float()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cached_generation_equals_full_recompute(family):
    model = make_model(family)
    recipe = random_recipe(model)
    ids = torch.tensor([IDS[0]])
    with recipe.apply(model, 1.5):
        seq, step_logits = _generate(model, ids, torch.ones_like(ids))
        full = logits(model, seq)
    n_prompt = ids.shape[1]
    recomputed = full[:, n_prompt - 1:-1]
    torch.testing.assert_close(step_logits, recomputed, rtol=1e-4, atol=1e-4)


def assert_padded_batch_equals_rows_alone(model, recipe):
    """Greedy generation of a left-padded batch gives each row what it gets alone."""
    ids, mask = pad_batch(IDS, 0, torch.device("cpu"))
    with recipe.apply(model, 1.5):
        seq, lg = _generate(model, ids, mask)
        for r, row in enumerate(IDS):
            one = torch.tensor([row])
            seq1, lg1 = _generate(model, one, torch.ones_like(one))
            assert seq[r, ids.shape[1]:].tolist() == seq1[0, one.shape[1]:].tolist()
            torch.testing.assert_close(lg[r], lg1[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_batch_equals_rows_alone(family):
    model = make_model(family)
    assert_padded_batch_equals_rows_alone(model, random_recipe(model))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_bf16_model_is_steered_and_keeps_its_dtype(family):
    model = make_model(family, dtype=torch.bfloat16)
    recipe = random_recipe(model)
    ids = torch.tensor([IDS[0]])
    seen = []
    h = model.get_submodule(recipe.entries[0].site.module).register_forward_hook(
        # Decoder blocks return a tuple in older transformers (e.g. GPT2Block in 5.0), a tensor later.
        lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype)
    )
    base = logits(model, ids)
    with recipe.apply(model, 1.0):
        steered = logits(model, ids)
    h.remove()
    assert set(seen) == {torch.bfloat16}
    assert torch.isfinite(steered).all() and not torch.equal(steered, base)
    assert recipe.entries[0].map.vector.dtype == torch.float32


def test_gate_scales_the_map_per_token():
    """A gate that is 1 on one token and 0 on another steers only the first."""
    from steerwise.gates import DSASGate
    from steerwise.hooks import SiteSteering, SteeringHandle
    from steerwise.maps import CAAMap

    model = make_model("llama")
    site = Site(name="mlp.0", module="model.layers.0.mlp", layer=0)
    d = 32
    seen = {}
    h = model.get_submodule(site.module).register_forward_hook(
        lambda m, a, o: seen.setdefault("x", o.detach().clone())
    )
    ids = torch.tensor([IDS[0]])
    logits(model, ids)
    x = seen.pop("x")[0]  # (tokens, d)
    h.remove()
    # Weight along token 0's activation with a large bias split: gate≈1 on token 0, ≈0 elsewhere.
    w = x[0] / x[0].norm()
    proj = x @ w
    margin = proj[0] - proj[1:].max()
    assert margin > 0
    k = 40.0 / margin  # logits of +-20 at the nearest tokens
    gate = DSASGate(w * k, -k * (proj[0] + proj[1:].max()) / 2)
    vec = torch.ones(d)
    out = {}
    with SteeringHandle(model, [SiteSteering(site, CAAMap(vec), gate)], 2.0):
        # registered after the steering hook, so it sees the steered output
        h2 = model.get_submodule(site.module).register_forward_hook(
            lambda m, a, o: out.setdefault("y", o.detach().clone())
        )
        logits(model, ids)
    h2.remove()
    diff = (out["y"][0] - x)
    torch.testing.assert_close(diff[0], 2.0 * vec, rtol=1e-4, atol=1e-4)
    assert diff[1:].abs().max() < 1e-4


def test_missing_site_error_names_model_and_choices():
    from steerwise.hooks import SiteSteering, SteeringHandle
    from steerwise.maps import CAAMap

    model = make_model("qwen2")
    bad = SiteSteering(Site("x", "model.layers.9"), CAAMap(torch.zeros(32)))
    with pytest.raises(SiteError, match=r"qwen2.*residual: model.layers.0"):
        SteeringHandle(model, [bad], 1.0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---- when a sequence starts: any cache keyword (transformers 5.24 passes `cache=`) --------------
def test_prefill_is_read_from_the_cache_under_either_keyword():
    from transformers import DynamicCache

    from steerwise.hooks import is_prefill

    model = make_model("llama")
    empty = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([IDS[0]]), use_cache=True).past_key_values
    assert full.get_seq_length() == 5
    for key in ("cache", "past_key_values", "kv_state_of_a_future_release"):
        assert is_prefill({key: empty}) is True
        assert is_prefill({key: full}) is False
    assert is_prefill({}) is True
    assert is_prefill({"cache_position": torch.tensor([4])}) is False
    assert is_prefill({"cache_position": torch.tensor([0, 1, 2])}) is True


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_decoding_steps_are_not_new_sequences_whatever_the_cache_keyword(keyword):
    """Gate traces keep every step and CAST keeps its prefill decision (broken by 5.24's
    rename when only ``past_key_values`` was read)."""
    from transformers import DynamicCache

    from steerwise.hooks import SteeringHandle

    model = make_model("llama")
    if keyword == "cache" and "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers (< 5.24) has no `cache=` keyword: the model would ignore it")
    recipe = random_recipe(model)
    ids = torch.tensor([IDS[0]])
    with SteeringHandle(model, recipe.entries, 1.0, trace=True) as handle, torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, **{keyword: cache}, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out = model(input_ids=nxt, **{keyword: cache}, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        _, values, _ = handle.gate_trace()
    assert values.shape[:2] == (1, ids.shape[1] + 3)


# ---- threads: a handle acts only in the context that applied it --------------------------------
def test_another_threads_forward_pass_is_not_steered():
    import threading

    model = make_model("qwen2")
    ids = torch.tensor([IDS[0]])
    base = logits(model, ids)
    recipe = random_recipe(model)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def steering_thread():
        with recipe.apply(model, 4.0):
            seen["steered"] = logits(model, ids)
            inside.set()
            done.wait(30)

    def plain_thread():
        inside.wait(30)
        seen["plain"] = logits(model, ids)
        done.set()

    threads = [threading.Thread(target=steering_thread), threading.Thread(target=plain_thread)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert torch.equal(seen["plain"], base)
    assert not torch.allclose(seen["steered"], base)


def test_two_threads_with_two_recipes_each_get_their_own():
    import threading

    model = make_model("llama")
    ids = torch.tensor([IDS[0]])
    recipes = [random_recipe(model, seed=1), random_recipe(model, seed=2)]
    alone = []
    for r in recipes:
        with r.apply(model, 3.0):
            alone.append(logits(model, ids))
    barrier = threading.Barrier(2)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(k):
        with recipes[k].apply(model, 3.0):
            barrier.wait(30)  # both recipes are installed on the model from here on
            for _ in range(5):
                got[k].append(logits(model, ids))
            barrier.wait(30)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in (0, 1):
        assert len(got[k]) == 5
        for out in got[k]:
            torch.testing.assert_close(out, alone[k], rtol=0, atol=0)


def test_activate_lends_a_handle_to_another_thread():
    import threading

    model = make_model("gpt2")
    ids = torch.tensor([IDS[0]])
    recipe = random_recipe(model)
    with recipe.apply(model, 2.0) as handle:
        steered = logits(model, ids)
        seen = {}

        def worker():
            with handle.activate():
                seen["x"] = logits(model, ids)

        t = threading.Thread(target=worker)
        t.start()
        t.join(60)
    assert torch.equal(seen["x"], steered)


# ---- NaN/inf strengths are refused at the boundary --------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "abc"])
def test_non_finite_strengths_are_refused(bad):
    model = make_model("qwen2")
    recipe = random_recipe(model)
    with pytest.raises(ValueError, match="strength must be a"):
        recipe.apply(model, bad)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with recipe.apply(model, 1.0) as handle:
        with pytest.raises(ValueError, match="strength must be a"):
            handle.strength = bad
        assert handle.strength == 1.0
