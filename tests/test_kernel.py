"""The shared steering kernel: stacks of recipes, per-row routing, compile, exactness."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_model

from steerwise.gates import DSASGate, NoGate
from steerwise.gates.cast import CASTGate
from steerwise.gates.e2e import E2EGate
from steerwise.hooks import SiteSteering, SteeringHandle
from steerwise.kernel import build_stack, steer
from steerwise.maps import CAAMap
from steerwise.maps.act import LinearActMap, MeanActMap
from steerwise.maps.iti import ITIMap
from steerwise.maps.lineas import LinEASMap
from steerwise.recipe import ModelIdentity, Recipe, apply_recipes
from steerwise.sites import resolve_sites

D = 32
MAPS = ("caa", "iti", "mean-act", "linear-act", "lineas")
GATES = ("none", "dsas", "dsas-constant", "e2e-sigmoid", "e2e-relu")


def make_map(kind: str, g: torch.Generator):
    r = lambda *s: torch.randn(*s, generator=g)
    if kind == "caa":
        return CAAMap(r(D))
    if kind == "iti":
        return ITIMap(r(D), r(4).abs(), torch.tensor([1.0, 0.0, 1.0, 1.0]))
    lo, hi = -r(D).abs() * 0.05, r(D).abs() * 0.05  # a support that excludes many tokens
    if kind == "mean-act":
        return MeanActMap(r(D), lo, hi, support=True)
    if kind == "linear-act":
        return LinearActMap(1 + 0.3 * r(D), r(D), lo, hi, support=True)
    return LinEASMap(1 + 0.3 * r(D), r(D))


def make_gate(kind: str, g: torch.Generator):
    w, b = torch.randn(D, generator=g) * 20, torch.randn((), generator=g)
    return {
        "none": lambda: NoGate(),
        "dsas": lambda: DSASGate(w, b),
        "dsas-constant": lambda: DSASGate(w, b, constant=True),
        "e2e-sigmoid": lambda: E2EGate(w, b, "sigmoid"),
        "e2e-relu": lambda: E2EGate(w, b, "relu"),
    }[kind]()


def recipe_entries(model, map_kind: str, gate_kind: str, seed: int, site: str = "residual"):
    g = torch.Generator().manual_seed(seed)
    return [
        SiteSteering(s, make_map(map_kind, g), make_gate(gate_kind, g), 0.5 + 0.5 * (i % 2))
        for i, s in enumerate(resolve_sites(model, site))
    ]


def as_recipe(model, entries) -> Recipe:
    return Recipe(ModelIdentity.of(model), entries, "mixed", "mixed", 1.0)


@pytest.mark.parametrize("map_kind,gate_kind", list(itertools.product(MAPS, GATES)))
def test_kernel_equals_each_map_and_gate_written_out(map_kind, gate_kind):
    """steer(x) = x + λ·a·h(x)·δ(x), with δ and h as each module computes them."""
    g = torch.Generator().manual_seed(3)
    m, gate = make_map(map_kind, g), make_gate(gate_kind, g)
    x = torch.randn(2, 5, D, generator=g) * 0.1
    stack = build_stack([(m.affine(), gate.linear_form(), 0.7)], D)
    out, gv = steer(x, stack, 1.5)
    from steerwise.gates.base import StepContext

    h = gate(x, StepContext())
    h = torch.ones(x.shape[:-1]) if h is None else h
    want = x + 1.5 * 0.7 * h.unsqueeze(-1) * m.delta(x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gv, 0.7 * h)


def test_a_stack_routes_each_token_to_its_recipe():
    """Every map × gate in one stack; per-token selection equals each recipe alone."""
    g = torch.Generator().manual_seed(0)
    combos = list(itertools.product(MAPS, GATES))
    parts = [(make_map(mk, g).affine(), make_gate(gk, g).linear_form(), 0.25 + i / len(combos))
             for i, (mk, gk) in enumerate(combos)]
    stack = build_stack(parts + [None], D)  # the last recipe steers nothing here
    n = 300
    x = torch.randn(n, D, generator=g) * 0.1
    index = torch.randint(0, len(parts) + 1, (n,), generator=g)
    strength = torch.rand(n, generator=g) * 4
    strength[::7] = 0.0
    out, gv = steer(x, stack, strength, index)
    for r in range(len(parts) + 1):
        rows = index == r
        if not rows.any():
            continue
        alone = build_stack([parts[r] if r < len(parts) else None], D)
        want, wg = steer(x[rows], alone, strength[rows])
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gv[rows], wg, rtol=1e-5, atol=1e-6)
    zero = strength == 0
    assert torch.equal(out[zero], x[zero])  # bit-identical, not just close


def test_kernel_compiles_fullgraph_and_matches_eager():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    mixed = build_stack([
        (make_map("caa", g).affine(), make_gate("dsas", g).linear_form(), 1.0),
        (make_map("linear-act", g).affine(), make_gate("e2e-relu", g).linear_form(), 0.5),
        (make_map("lineas", g).affine(), make_gate("none", g).linear_form(), 1.0),
        None,
    ], D)
    one = build_stack([(make_map("caa", g).affine(), make_gate("dsas", g).linear_form(), 1.0)], D)
    x = torch.randn(64, D, generator=g)
    strength = torch.rand(64, generator=g) * 3
    strength[:9] = 0
    index = torch.randint(0, 4, (64,), generator=g)
    compiled = torch.compile(steer, fullgraph=True, backend="aot_eager")
    for args in ((x, mixed, strength, index), (x, one, strength, None), (x, one, 2.0, None)):
        eager_out, eager_g = steer(*args)
        comp_out, comp_g = compiled(*args)
        torch.testing.assert_close(comp_out, eager_out, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(comp_g, eager_g, rtol=1e-6, atol=1e-6)


def test_external_gates_need_their_values():
    stack = build_stack([(CAAMap(torch.ones(D)).affine(), CASTGate("follow").linear_form(), 1.0)], D)
    assert stack.needs_external
    with pytest.raises(ValueError, match="external gate"):
        steer(torch.zeros(3, D), stack, 1.0)
    out, _ = steer(torch.zeros(3, D), stack, 2.0, external=torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(out[1], torch.zeros(D)) and torch.equal(out[0], torch.full((D,), 2.0))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_several_recipes_in_one_batch_equal_each_row_alone(family):
    """The engine feature the server needs: one forward, each row its own recipe and strength."""
    model = make_model(family)
    recipes = {
        "caa-dsas": as_recipe(model, recipe_entries(model, "caa", "dsas", 1)),
        "linear-act-relu": as_recipe(model, recipe_entries(model, "linear-act", "e2e-relu", 2)),
        "lineas-none": as_recipe(model, recipe_entries(model, "lineas", "none", 3, site="mlp")),
        "iti-constant": as_recipe(model, recipe_entries(model, "iti", "dsas-constant", 4)),
    }
    rows = [("caa-dsas", 3.0), (None, 5.0), ("lineas-none", 0.5), ("linear-act-relu", 2.0),
            ("caa-dsas", 0.0), ("iti-constant", 1.5)]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (len(rows), 7), generator=g)
    base = _logits(model, ids)
    with apply_recipes(model, recipes) as handle:
        handle.route([r for r, _ in rows], [s for _, s in rows])
        batched = _logits(model, ids)
    for i, (name, s) in enumerate(rows):
        if name is None or s == 0.0:
            assert torch.equal(batched[i], base[i])
            continue
        with recipes[name].apply(model, s):
            alone = _logits(model, ids[i:i + 1])[0]
        torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(alone, base[i], atol=1e-4)


def test_routing_errors_are_clear():
    model = make_model("qwen2")
    r = as_recipe(model, recipe_entries(model, "caa", "dsas", 1))
    ids = torch.tensor([[5, 6, 7]])
    base = _logits(model, ids)
    with apply_recipes(model, {"a": r, "b": r}) as handle:
        assert torch.equal(_logits(model, ids), base)  # unrouted rows are unsteered
        with pytest.raises(KeyError, match="'a', 'b'"):
            handle.route(["c"], [1.0])
        with pytest.raises(ValueError, match="finite"):
            handle.route(["a"], [float("nan")])
        with pytest.raises(ValueError, match="several recipes"):
            handle.strength = 1.0
        handle.route(["a", "b"], [1.0, 2.0])
        with pytest.raises(ValueError, match="2 rows but the model runs a batch of 3"):
            _logits(model, torch.tensor([[5, 6, 7]] * 3))


def test_all_zero_routing_leaves_the_model_untouched_bit_for_bit():
    model = make_model("mistral")
    r = as_recipe(model, recipe_entries(model, "linear-act", "dsas", 5))
    ids = torch.tensor([[5, 9, 12, 7], [3, 4, 5, 6]])
    base = _logits(model, ids)
    with apply_recipes(model, {"a": r}) as handle:
        handle.route(["a", None], [0.0, 3.0])
        assert torch.equal(_logits(model, ids), base)


def test_trainable_maps_still_get_gradients_through_the_kernel():
    model = make_model("llama")
    entries = recipe_entries(model, "lineas", "e2e-sigmoid", 2)
    with SteeringHandle(model, entries, 1.0):
        loss = model(input_ids=torch.tensor([[5, 9, 12]])).logits.square().mean()
    loss.backward()
    for e in entries:
        assert e.map.omega.grad is not None and e.map.omega.grad.abs().sum() > 0
        assert e.gate.weight.grad is not None
