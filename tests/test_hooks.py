"""Invariants of steering hooks, on tiny random models of every tested family."""

import pytest
import torch

from conftest import FAMILIES, make_model, random_recipe
from steerwise.activations import pad_batch
from steerwise.sites import SiteError, Site

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
    with pytest.raises(RuntimeError, match="boom"):
        with random_recipe(model).apply(model, 3.0):
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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_batch_equals_rows_alone(family):
    model = make_model(family)
    recipe = random_recipe(model)
    ids, mask = pad_batch(IDS, 0, torch.device("cpu"))
    with recipe.apply(model, 1.5):
        seq, lg = _generate(model, ids, mask)
        for r, row in enumerate(IDS):
            one = torch.tensor([row])
            seq1, lg1 = _generate(model, one, torch.ones_like(one))
            assert seq[r, ids.shape[1]:].tolist() == seq1[0, one.shape[1]:].tolist()
            torch.testing.assert_close(lg[r], lg1[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_bf16_model_is_steered_and_keeps_its_dtype(family):
    model = make_model(family, dtype=torch.bfloat16)
    recipe = random_recipe(model)
    ids = torch.tensor([IDS[0]])
    seen = []
    h = model.get_submodule(recipe.entries[0].site.module).register_forward_hook(
        lambda m, a, o: seen.append(o.dtype)
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
