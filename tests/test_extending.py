"""docs/extending.md, run: a toy map and a toy gate defined here, registered, fitted with
``steerwise.fit.fit``, applied through ``Recipe.apply`` on a tiny HF model and through the kernel
(``steerwise.kernel.steer``). The code blocks of docs/extending.md are the ones below (a test
checks they have not drifted apart)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer

from steerwise.kernel import AffineMap
from steerwise.maps import SteeringMap, register_map
from steerwise.options import Options, option


# ---- docs/extending.md: adding a map -------------------------------------------------------------
@dataclass
class MedianShiftOptions(Options):
    scale: float = option(1.0, "multiplies the shift")


@register_map
class MedianShiftMap(SteeringMap):
    """δ(t) = scale · (median(T) − median(S)): CAA with medians."""

    method = "median-shift"
    Options = MedianShiftOptions

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift.detach().float().clone())

    def affine(self) -> AffineMap:
        return AffineMap(b=self.shift)

    @classmethod
    def empty(cls, dim: int, config: dict) -> MedianShiftMap:
        return cls(torch.zeros(dim))

    @classmethod
    def fit(cls, source, target, options=None, **kwargs) -> MedianShiftMap:
        opts = cls.options(options, **kwargs)  # a dict, an instance or keywords, checked
        return cls(opts.scale * (target.median(0).values - source.median(0).values))
# ---- end of the map ------------------------------------------------------------------------------


# ---- docs/extending.md: adding a gate ------------------------------------------------------------
from steerwise.gates import Gate, GateFit, GateFitter, register_gate, register_gate_fitter
from steerwise.kernel import LinearGate


@register_gate
class CentroidGate(Gate):
    """h(t) = sigmoid(w·t + c): open on the source side of the midpoint of the two means."""

    kind = "centroid"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().reshape(()).clone())

    def linear_form(self) -> LinearGate:  # the kernel runs it, no Python per token
        return LinearGate("sigmoid", self.weight, self.bias)

    def forward(self, t, ctx):
        return torch.sigmoid(t @ self.weight + self.bias)

    @classmethod
    def empty(cls, dim: int, config: dict) -> CentroidGate:
        return cls(torch.zeros(dim), torch.zeros(()))


@dataclass
class CentroidOptions(Options):
    sharpness: float = option(1.0, "multiplies the gate's logit")


@register_gate_fitter
class CentroidFitter(GateFitter):
    kind = "centroid"
    Options = CentroidOptions  # read from FitOptions.gate_options (a dict)

    def fit(self, sites, acts_s, acts_c, opts) -> GateFit:
        k = self.options(opts).sharpness
        gates, scales, diags = {}, {}, {}
        for s in sites:
            mu_s, mu_c = acts_s[s.name]["mean"].mean(0), acts_c[s.name]["mean"].mean(0)
            w = k * (mu_s - mu_c) / (mu_s - mu_c).norm().clamp_min(1e-12) ** 2
            gates[s.name] = CentroidGate(w, -w @ (mu_s + mu_c) / 2)
            scales[s.name] = 1.0
            diags[s.name] = {}
        return GateFit(gates, scales, diags)
# ---- end of the gate -----------------------------------------------------------------------------

from steerwise.fit import fit
from steerwise.gates import GATE_FITTERS, GATE_REGISTRY, StepContext
from steerwise.kernel import build_stack, steer
from steerwise.maps import MAP_REGISTRY
from steerwise.recipe import Recipe

SOURCE = ["apple pear banana fruit", "sweet ripe apple", "banana fruit sweet", "ripe pear apple",
          "fruit apple banana ripe", "pear sweet fruit", "apple banana pear", "sweet fruit ripe"]
CONTROL = ["car bus train road", "dog cat bird animal", "rain snow sun cold", "fast wheel road",
           "bird runs dog sleeps", "cold rain sky", "train bus fast", "animal cat sleeps"]
PROMPT = "the sweet apple and the fast car"


@pytest.fixture(scope="module", autouse=True)
def _unregister_afterwards():
    yield
    MAP_REGISTRY.pop("median-shift", None)
    GATE_REGISTRY.pop("centroid", None)
    GATE_FITTERS.pop("centroid", None)


@pytest.fixture(scope="module")
def fitted():
    model, tok = make_model("gpt2"), make_tokenizer()
    recipe = fit(model, tok, SOURCE, CONTROL, method="median-shift", gate="centroid",
                 layers="1-2", map_options={"scale": 2.0}, gate_options={"sharpness": 4.0},
                 progress=False)
    return model, tok, recipe


def _site_output(model, tok, site, recipe=None, strength=1.0) -> torch.Tensor:
    """The activation at ``site`` for PROMPT (after the steering's own hook, if any)."""
    seen = {}

    def keep(module, args, output):
        seen["x"] = (output if isinstance(output, torch.Tensor) else output[site.tuple_index or 0])

    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        if recipe is None:
            handle = model.get_submodule(site.module).register_forward_hook(keep)
            try:
                model(**ids)
            finally:
                handle.remove()
        else:
            with recipe.apply(model, strength):
                handle = model.get_submodule(site.module).register_forward_hook(keep)
                try:
                    model(**ids)
                finally:
                    handle.remove()
    return seen["x"].detach().clone()


def test_the_toy_kinds_are_fitted_with_their_options(fitted):
    model, tok, recipe = fitted
    assert recipe.method == "median-shift" and recipe.gate == "centroid"
    assert [e.site.layer for e in recipe.entries] == [1, 2]
    assert all(isinstance(e.map, MedianShiftMap) and isinstance(e.gate, CentroidGate)
               for e in recipe.entries)
    assert recipe.fit_info["options"]["map_options"] == {"scale": 2.0}
    assert recipe.fit_info["options"]["gate_options"] == {"sharpness": 4.0}
    e = recipe.entries[0]
    ctx = StepContext()
    src = fitted_means(model, tok, e.site, SOURCE)
    ctl = fitted_means(model, tok, e.site, CONTROL)
    assert e.gate(src, ctx).mean() > 0.5 > e.gate(ctl, ctx).mean()  # open on S, shut on C


def fitted_means(model, tok, site, texts):
    from steerwise.activations import collect_activations

    return collect_activations(model, tok, texts, [site], progress=False)[site.name]["mean"]


def test_a_misspelt_toy_option_is_refused():
    model, tok = make_model("gpt2"), make_tokenizer()
    with pytest.raises(ValueError, match=r"'scal' \(did you mean scale\?\)"):
        fit(model, tok, SOURCE, CONTROL, method="median-shift", gate="none",
            map_options={"scal": 2.0}, progress=False)
    with pytest.raises(ValueError, match=r"'sharp' \(did you mean sharpness\?\)"):
        fit(model, tok, SOURCE, CONTROL, method="caa", gate="centroid",
            gate_options={"sharp": 2.0}, progress=False)


def test_the_hf_hooks_and_the_kernel_steer_the_same(fitted):
    """Recipe.apply (HF hooks) at the first steered site equals steer() on the unsteered
    activation, which equals the formula x + λ·a·h(x)·δ(x) from the toy classes themselves."""
    model, tok, recipe = fitted
    e = recipe.entries[0]
    x = _site_output(model, tok, e.site)
    hooked = _site_output(model, tok, e.site, recipe, 3.0)
    stack = build_stack([(e.map.affine(), e.gate.linear_form(), e.scale)], x.shape[-1])
    kernel, gate = steer(x, stack, 3.0)
    by_hand = x + 3.0 * e.scale * e.gate(x, StepContext()).unsqueeze(-1) * e.map.delta(x)
    torch.testing.assert_close(kernel, by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate, e.scale * e.gate(x, StepContext()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hooked, kernel, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(hooked, x)


def test_a_toy_recipe_saves_loads_and_steers_identically(fitted, tmp_path):
    model, tok, recipe = fitted
    loaded = Recipe.from_pretrained(recipe.save_pretrained(tmp_path / "toy"))
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        with recipe.apply(model, 2.0):
            a = model(**ids).logits
        with loaded.apply(model, 2.0):
            b = model(**ids).logits
        base = model(**ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, base)


# ---- docs/extending.md: adding a backend ---------------------------------------------------------
from steerwise.compile import Backend, check_backend, compile_steering
from steerwise.hooks import rewrite_output
from steerwise.positions import first_token_keep

TOY_BACKEND = Backend("the toy backend", external_gates=False,
                      external_reason="keeps no per-sequence state")


def run_steered(model, recipes, routes, ids, mask):
    compiled = compile_steering(recipes, model)
    check_backend(compiled, TOY_BACKEND)
    index = torch.tensor([0 if name is None else compiled.names.index(name) for name, _ in routes])
    strength = torch.tensor([0.0 if name is None else s for name, s in routes])
    per_token = strength[:, None].expand(ids.shape)
    skip = torch.tensor(compiled.skip_first)[index]  # rows whose recipe leaves the first token
    per_token = torch.where(skip[:, None], per_token * first_token_keep(mask, *ids.shape),
                            per_token)
    handles = []
    for cs in compiled.sites:
        def hook(module, args, output, cs=cs):
            return rewrite_output(output, cs.site.tuple_index,
                                  lambda x: steer(x, cs.stack, per_token, index[:, None])[0],
                                  cs.site.name)
        handles.append(model.get_submodule(cs.site.module).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for h in handles:
            h.remove()
# ---- end of the backend --------------------------------------------------------------------------


@pytest.mark.parametrize("first_token", ["steer", "skip"])
def test_the_toy_backend_gives_the_hf_hooks_logits(fitted, first_token):
    """run_steered (compile_steering + routing + the kernel) equals the HF hooks on a left-padded
    batch with one row steered and one not, whatever the position policy."""
    import dataclasses

    from steerwise.activations import pad_batch
    from steerwise.recipe import apply_recipes

    model, tok, recipe = fitted
    recipe = dataclasses.replace(recipe, first_token=first_token)
    rows = [tok(t)["input_ids"] for t in (PROMPT, "sweet apple fruit")]
    ids, mask = pad_batch(rows, tok.pad_token_id, torch.device("cpu"))
    assert int(mask[1].argmax()) > 0  # the second row is left-padded
    routes = [("toy", 3.0), (None, 0.0)]
    got = run_steered(model, {"toy": recipe}, routes, ids, mask)
    with torch.no_grad():
        with apply_recipes(model, {"toy": recipe}) as handle:
            handle.route(["toy", None], [3.0, 0.0])
            want = model(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], plain[1]) and not torch.allclose(got[0], plain[0])
    with pytest.raises(ValueError, match="toy backend keeps no per-sequence state"):
        cast = fit(model, tok, SOURCE, CONTROL, method="caa", gate="cast", layers="1-2",
                   progress=False)
        run_steered(model, {"cast": cast}, [("cast", 1.0), (None, 0.0)], ids, mask)


def test_the_docs_show_the_code_this_file_runs():
    doc = (Path(__file__).parents[1] / "docs" / "extending.md").read_text(encoding="utf-8")
    here = {line.strip() for line in Path(__file__).read_text(encoding="utf-8").splitlines()}
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert len(blocks) >= 3
    for block in blocks:
        for line in block.strip().splitlines():
            assert line.strip() in here, f"docs/extending.md line not in the test: {line!r}"
