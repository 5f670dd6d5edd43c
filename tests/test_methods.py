"""The methods family: ITI, Mean-/Linear-AcT, LinEAS maps; CAST and E2E-DSAS gates.

Each map recovers a known answer on synthetic data; every map × gate combination fits, saves,
loads and reproduces identical outputs, and strength 0 is the unsteered model.
"""

from __future__ import annotations

import pytest
import torch
from threadpoolctl import threadpool_limits

from conftest import FAMILIES, make_model
from steerwise.activations import pad_batch
from steerwise.fit import GATES, FitOptions, fit
from steerwise.gates import CASTGate, DSASOptions, E2EGate, E2EOptions, StepContext
from steerwise.gates.cast import CASTOptions, best_threshold, cast_similarity, fit_condition
from steerwise.hooks import SiteSteering
from steerwise.maps import CAAMap, ITIMap, LinEASMap, LinearActMap, MeanActMap
from steerwise.maps.lineas import LinEASOptions, w2_per_dim
from steerwise.recipe import ModelIdentity, Recipe
from steerwise.sites import resolve_sites, site_width

METHODS = ("caa", "iti", "mean-act", "linear-act", "lineas")

# Three disjoint vocabularies of the test tokenizer: source, target, control.
SOURCE = [
    "apple pear banana fruit", "sweet ripe apple", "banana fruit sweet", "ripe pear apple",
    "fruit apple banana ripe", "pear sweet fruit", "apple banana pear", "sweet fruit ripe pear",
    "banana ripe sweet apple", "fruit pear apple sweet",
]
TARGET = [
    "music song band", "sport ball game", "song music game", "band sport ball",
    "game song music band", "ball game sport", "music band", "song ball sport game",
    "band music song", "sport game ball music",
]
CONTROL = [
    "car bus train road", "dog cat bird animal", "rain snow sun cold", "fast wheel road car",
    "bird runs dog sleeps", "cold rain sky", "train bus fast", "animal cat sleeps",
    "sun warm sky", "road wheel bus train",
]


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny problems: extra threads only contend (3-5x slower on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(before)


def make_wide_model(family: str = "llama", init: float = 0.3, seed: int = 0):
    """A tiny random model whose activations are O(1) (the default init makes them ~0.01)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **FAMILIES[family], vocab_size=64, pad_token_id=0,
                               eos_token_id=1, bos_token_id=1, initializer_range=init)
    return AutoModelForCausalLM.from_config(cfg).eval()


def quick(**kw) -> FitOptions:
    """Small, fast fit options for the tiny test models."""
    opts = FitOptions(dsas=DSASOptions(cv_folds=3, n_components=3, threshold=0.0),
                      cast=CASTOptions(cv_folds=3),
                      lineas=LinEASOptions(steps=6, batch_size=4), probe_accuracy=False)
    for k, v in kw.items():
        setattr(opts, k, v)
    return opts


def logits(model, tok, texts, recipe=None, strength=1.0):
    ids, mask = pad_batch(tok(texts)["input_ids"], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        if recipe is None:
            return model(input_ids=ids, attention_mask=mask).logits
        with recipe.apply(model, strength):
            return model(input_ids=ids, attention_mask=mask).logits


# ---- maps recover known answers ---------------------------------------------------------------
def test_mean_act_and_caa_recover_a_known_mean_shift():
    g = torch.Generator().manual_seed(0)
    shift = torch.linspace(-2, 3, 16)
    source = torch.randn(4000, 16, generator=g)
    target = torch.randn(4000, 16, generator=g) + shift
    for cls in (MeanActMap, CAAMap):
        m = cls.fit(source, target)
        torch.testing.assert_close(m.delta(torch.zeros(16)), shift, atol=0.1, rtol=0)
    # support restriction: no shift where a coordinate is outside the source's [min, max]
    m = MeanActMap.fit(source, target, support=True)
    far = torch.full((16,), 100.0)
    assert torch.equal(m.delta(far), torch.zeros(16))
    torch.testing.assert_close(m.delta(torch.zeros(16)), shift, atol=0.1, rtol=0)


def test_linear_act_recovers_a_known_per_dimension_affine_transport():
    g = torch.Generator().manual_seed(1)
    a = torch.linspace(0.5, 2.0, 8)
    b = torch.linspace(-1.0, 1.0, 8)
    source = torch.randn(5000, 8, generator=g) * 1.5 + 0.3
    target = (torch.randn(5000, 8, generator=g) * 1.5 + 0.3) * a + b  # same law, mapped
    m = LinearActMap.fit(source, target)
    torch.testing.assert_close(m.omega, a, atol=0.06, rtol=0)
    torch.testing.assert_close(m.beta, b, atol=0.1, rtol=0)
    x = torch.randn(5, 8, generator=g)
    torch.testing.assert_close(x + m.delta(x), m.omega * x + m.beta)  # full transport at λ = 1
    # λ in [0, 1] interpolates: (1 − λ)·t + λ·(ω⊙t + β)
    torch.testing.assert_close(m(x, 0.25), 0.75 * x + 0.25 * (m.omega * x + m.beta))
    # support restriction (default on): identity outside [min, max] of the source samples
    out = source.max(0).values + 1.0
    assert torch.equal(m.delta(out), torch.zeros(8))
    assert not LinearActMap.fit(source, target, support=False).delta(out).eq(0).all()
    lo, hi = LinearActMap.fit(source, target, support_quantiles=(0.1, 0.9)).lo, m.lo
    assert (lo > hi).all()  # the quantile support is narrower


def test_iti_direction_and_scale_match_a_planted_direction():
    g = torch.Generator().manual_seed(2)
    u = torch.nn.functional.normalize(torch.randn(24, generator=g), dim=0)
    source = torch.randn(300, 24, generator=g) - 1.5 * u
    target = torch.randn(300, 24, generator=g) + 1.5 * u
    m = ITIMap.fit(source, target)
    theta = m.unit
    assert float(theta @ u) > 0.9  # points from source towards target
    both = torch.cat([source, target])
    torch.testing.assert_close(m.sigma[0], (both @ theta).std(unbiased=False), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(m.delta(source), m.sigma[0] * theta)
    assert m.accuracy[0] > 0.88  # Bayes accuracy Φ(1.5) ≈ 0.93


def test_iti_per_head_top_k_selects_the_heads_with_signal_and_zeroes_the_rest():
    g = torch.Generator().manual_seed(3)
    n_heads, hd = 4, 6
    maps = []
    for layer in range(3):
        s = torch.randn(120, n_heads * hd, generator=g)
        t = torch.randn(120, n_heads * hd, generator=g)
        if layer == 1:  # signal only in head 2 of layer 1, and a weaker one in head 0 of layer 2
            t[:, 2 * hd:3 * hd] += 2.0
        if layer == 2:
            t[:, 0:hd] += 0.8
        maps.append(ITIMap.fit(s, t, n_heads=n_heads))
    assert ITIMap.select_top_k(maps, 2) == 2
    assert maps[1].mask.tolist() == [0, 0, 1, 0] and maps[2].mask.tolist() == [1, 0, 0, 0]
    assert not maps[0].mask.any()
    d = maps[1].delta(torch.zeros(n_heads * hd)).view(n_heads, hd)
    assert d[2].abs().sum() > 0 and d[[0, 1, 3]].abs().sum() == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_iti_on_head_sites_fits_and_steers_every_family(family, tokenizer):
    model = make_model(family)
    recipe = fit(model, tokenizer, SOURCE, CONTROL, TARGET,
                 quick(method="iti", gate="none", site="heads", map_options={"top_k_heads": 3}),
                 progress=False)
    heads = model.config.num_attention_heads if hasattr(model.config, "num_attention_heads") \
        else model.config.n_head
    assert all(e.map.n_groups == heads for e in recipe.entries)
    assert sum(int(e.map.mask.sum()) for e in recipe.entries) == 3
    assert recipe.entries[0].dim == site_width(model, recipe.entries[0].site)
    base = logits(model, tokenizer, SOURCE[:2])
    assert not torch.allclose(logits(model, tokenizer, SOURCE[:2], recipe, 4.0), base)


# ---- LinEAS ------------------------------------------------------------------------------------
def test_w2_per_dim_is_sorted_mse():
    x = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    y = torch.tensor([[0.0, 5.0], [2.0, 1.0]])
    # dim 0: sorted (1,3) vs (0,2) → 1; dim 1: (0,2) vs (1,5) → (1 + 9)/2 = 5
    assert float(w2_per_dim(x, y)) == pytest.approx((1 + 1 + 1 + 9) / 4)


def test_lineas_lowers_its_loss_and_is_deterministic(tokenizer):
    model = make_model("qwen2")
    opts = quick(method="lineas", gate="none",
                 lineas=LinEASOptions(steps=60, lr=3e-2, batch_size=4, seed=5))
    r1 = fit(model, tokenizer, SOURCE, CONTROL, TARGET, opts, progress=False)
    info = r1.fit_info["training"]
    assert info["w2_final"] < 0.7 * info["w2_initial"]
    assert info["active_dims"] == info["total_dims"] and info["active_layers"] == 3
    r2 = fit(model, tokenizer, SOURCE, CONTROL, TARGET, opts, progress=False)
    for e1, e2 in zip(r1.entries, r2.entries):
        assert torch.equal(e1.map.omega, e2.map.omega) and torch.equal(e1.map.beta, e2.map.beta)
    assert not any(p.requires_grad is False for p in model.parameters())  # model restored


def test_lineas_with_strong_l1_collapses_to_identity(tokenizer):
    model = make_model("llama")
    opts = quick(method="lineas", gate="none",
                 lineas=LinEASOptions(steps=25, lr=1e-2, batch_size=4, l1=50.0))
    recipe = fit(model, tokenizer, SOURCE, CONTROL, TARGET, opts, progress=False)
    info = recipe.fit_info["training"]
    assert info["active_dims"] == 0 and info["active_layers"] == 0
    assert all(e.diagnostics["active_dims"] == 0 for e in recipe.entries)
    base = logits(model, tokenizer, SOURCE[:3])
    assert torch.equal(logits(model, tokenizer, SOURCE[:3], recipe, 1.0), base)
    # a group lasso alone switches whole layers off
    opts.lineas = LinEASOptions(steps=25, lr=1e-2, batch_size=4, group_l1=50.0)
    info = fit(model, tokenizer, SOURCE, CONTROL, TARGET, opts, progress=False).fit_info["training"]
    assert info["active_layers"] == 0


# ---- E2E-DSAS ----------------------------------------------------------------------------------
def _mean_gate(model, tok, recipe, texts):
    ids, mask = pad_batch(tok(texts)["input_ids"], tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad(), recipe.apply(model, 1.0, trace=True) as handle:
        model(input_ids=ids, attention_mask=mask)
        _, values, m = handle.gate_trace()
    w = m.float().unsqueeze(-1)
    return float((values * w).sum() / (w.sum() * values.shape[-1]))


@pytest.mark.parametrize(("activation", "init"), [("sigmoid", "zero"), ("relu", "dsas")])
def test_e2e_gates_end_up_higher_on_source_than_on_control(tokenizer, activation, init):
    """From zero (0.5 everywhere) the sigmoid gates learn to tell S from C on their own."""
    model = make_wide_model()
    opts = quick(method="lineas", gate="e2e",
                 lineas=LinEASOptions(steps=30, lr=5e-2, batch_size=4),
                 e2e=E2EOptions(gamma=1.0, activation=activation, init=init))
    recipe = fit(model, tokenizer, SOURCE, CONTROL, TARGET, opts, progress=False)
    assert all(isinstance(e.gate, E2EGate) and e.gate.activation == activation
               for e in recipe.entries)
    src, ctl = (_mean_gate(model, tokenizer, recipe, t) for t in (SOURCE, CONTROL))
    assert src > ctl + 0.2, (src, ctl)
    info = recipe.fit_info["training"]
    assert info["trained"] == "maps+gates" and info["w2_final"] < info["w2_initial"]
    assert all(d["gate_mean_source"] > d["gate_mean_control"] for d in recipe.diagnostics())


def test_e2e_relu_init_follows_the_dsas_gate_near_its_boundary():
    w, b = torch.tensor([2.0, -1.0]), torch.tensor(0.3)
    g = E2EGate.init(2, "relu", w, b)
    z = torch.tensor([[0.01, 0.02]])
    torch.testing.assert_close(g(z, StepContext()), torch.sigmoid(z @ w + b), atol=1e-3, rtol=0)
    assert float(g(torch.tensor([[-5.0, 0.0]]), StepContext()).detach()) == 0.0


# ---- CAST --------------------------------------------------------------------------------------
def test_cast_threshold_grid_search_maximises_f1():
    import numpy as np

    sims = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    thr, side, f1 = best_threshold(sims, labels)
    assert side == "greater" and 0.3 < thr < 0.7 and f1 == 1.0
    thr, side, f1 = best_threshold(-sims, labels)
    assert side == "smaller" and f1 == 1.0


def test_cast_condition_separates_source_from_control_rows():
    g = torch.Generator().manual_seed(4)
    u = torch.nn.functional.normalize(torch.randn(16, generator=g), dim=0)
    base = torch.randn(16, generator=g) * 3
    s = base + torch.randn(60, 16, generator=g) * 0.3 + 2.0 * u
    c = base + torch.randn(60, 16, generator=g) * 0.3 - 2.0 * u
    res = fit_condition(s, c)
    assert res.f1 > 0.95 and res.accuracy > 0.95
    assert abs(float(torch.from_numpy(res.vector).float() @ u)) > 0.9
    sims_s = cast_similarity(s, torch.from_numpy(res.vector).float())
    assert ((sims_s > res.threshold) == (res.comparator == "greater")).float().mean() > 0.95


def _cast_recipe(model, tokenizer, cond_layer: int) -> tuple[Recipe, list[str], list[float]]:
    """CAA on every residual layer, CAST-gated at ``cond_layer``; plus three prompts (two that
    the condition accepts, one it rejects, each taken alone) and their expected decisions."""
    sites = resolve_sites(model, "residual")
    from steerwise.activations import collect_activations

    acts_s = collect_activations(model, tokenizer, SOURCE, sites, progress=False)
    acts_c = collect_activations(model, tokenizer, CONTROL, sites, progress=False)
    cond = sites[cond_layer].name
    res = fit_condition(acts_s[cond]["mean"], acts_c[cond]["mean"])
    vec = torch.from_numpy(res.vector).float()

    def fires(h):
        sim = cast_similarity(h, vec)
        return (sim > res.threshold) if res.comparator == "greater" else (sim < res.threshold)

    yes = [t for t, f in zip(SOURCE, fires(acts_s[cond]["mean"])) if f]
    no = [t for t, f in zip(CONTROL, fires(acts_c[cond]["mean"])) if not f]
    assert len(yes) >= 2 and no, "the condition separates nothing on this model"
    prompts, expected = [yes[0], no[0], yes[1]], [1.0, 0.0, 1.0]
    entries = []
    g = torch.Generator().manual_seed(0)
    for s in sites:
        gate = (CASTGate("condition", vector=torch.from_numpy(res.vector).float(),
                         threshold=res.threshold, comparator=res.comparator, condition_site=cond)
                if s.name == cond else CASTGate("follow", condition_site=cond))
        entries.append(SiteSteering(s, CAAMap(torch.randn(32, generator=g)), gate))
    return Recipe(ModelIdentity.of(model), entries, "caa", "cast"), prompts, expected


@pytest.mark.parametrize("cond_layer", [0, 2])
def test_cast_decides_per_row_in_a_mixed_batch_and_keeps_it_while_decoding(tokenizer, cond_layer):
    model = make_model("llama", seed=3)
    recipe, prompts, expected = _cast_recipe(model, tokenizer, cond_layer)
    ids, mask = pad_batch(tokenizer(prompts)["input_ids"], 0, torch.device("cpu"))
    with torch.no_grad(), recipe.apply(model, 1.0, trace=True) as handle:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                             do_sample=False, pad_token_id=0)
        _, values, m = handle.gate_trace()
    n_prompt = ids.shape[1]
    expected = torch.tensor(expected)
    assert len({len(r) for r in tokenizer(prompts)["input_ids"]}) > 1  # left padding happens
    for r in range(3):
        real = m[r].bool()
        decode = values[r, n_prompt:]  # every generated step, every layer
        assert torch.equal(decode, expected[r].expand_as(decode))
        prompt = values[r, :n_prompt][real[:n_prompt]]  # prompt tokens, per layer
        # layers before the condition layer leave the prompt unsteered (no decision yet)
        assert torch.equal(prompt[:, :cond_layer], torch.zeros_like(prompt[:, :cond_layer]))
        assert torch.equal(prompt[:, cond_layer:], expected[r].expand_as(prompt[:, cond_layer:]))
    # rows alone give the same tokens as in the mixed batch
    with torch.no_grad(), recipe.apply(model, 1.0):
        for r, p in enumerate(prompts):
            one = torch.tensor([tokenizer(p)["input_ids"]])
            alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert alone[0, one.shape[1]:].tolist() == out[r, n_prompt:].tolist()


def test_cast_fit_with_a_condition_layer_that_is_not_steered(tokenizer):
    model = make_model("llama")
    opts = quick(method="caa", gate="cast", layers="0-1",
                 cast=CASTOptions(condition_layer=2, cv_folds=3))
    recipe = fit(model, tokenizer, SOURCE, CONTROL, TARGET, opts, progress=False)
    assert [e.site.layer for e in recipe.entries] == [0, 1, 2]
    cond = recipe.entries[2]
    assert cond.gate.role == "condition" and cond.diagnostics["condition_only"]
    assert torch.equal(cond.map.delta(torch.zeros(32)), torch.zeros(32))
    assert recipe.fit_info["cast"]["condition_site"] == "residual.2"


# ---- every map × every gate --------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_every_gate_with_this_map_saves_loads_reproduces_and_strength_zero_is_unsteered(
    method, tokenizer, tmp_path
):
    model = make_model("qwen2")
    texts = [SOURCE[1], CONTROL[2] + " the", TARGET[0]]
    base = logits(model, tokenizer, texts)
    for gate in GATES:
        recipe = fit(model, tokenizer, SOURCE, CONTROL, TARGET, quick(method=method, gate=gate),
                     progress=False)
        assert recipe.method == method and recipe.gate == gate
        steered = logits(model, tokenizer, texts, recipe, 2.0)
        assert torch.equal(logits(model, tokenizer, texts, recipe, 0.0), base), gate
        path = recipe.save_pretrained(tmp_path / f"{method}-{gate}")
        loaded = Recipe.from_pretrained(path)
        assert torch.equal(logits(model, tokenizer, texts, loaded, 2.0), steered), gate
        assert torch.equal(logits(model, tokenizer, texts, loaded, 0.0), base), gate
        assert [e.gate.kind for e in loaded.entries] == [e.gate.kind for e in recipe.entries]
        if gate != "none":
            assert all("gate_accuracy" in d for d in loaded.diagnostics())


def test_probe_and_gate_accuracy_are_reported_per_site(tokenizer, tmp_path):
    model = make_model("gpt2")
    opts = quick(method="iti", gate="dsas", probe_accuracy=True)
    recipe = fit(model, tokenizer, SOURCE, CONTROL, TARGET, opts, progress=False)
    for d in recipe.diagnostics():
        assert 0.0 <= d["probe_accuracy"] <= 1.0 and 0.0 <= d["gate_accuracy"] <= 1.0
    loaded = Recipe.from_pretrained(recipe.save_pretrained(tmp_path / "r"))
    assert [d["probe_accuracy"] for d in loaded.diagnostics()] == \
        [d["probe_accuracy"] for d in recipe.diagnostics()]


def test_lineas_map_refuses_an_offline_fit_and_bad_options_are_named():
    with pytest.raises(TypeError, match="end to end"):
        LinEASMap.fit(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="e2e-gate"):
        E2EOptions(activation="tanh").check()
    with pytest.raises(ValueError, match="n_heads"):
        ITIMap.fit(torch.randn(8, 10), torch.randn(8, 10), n_heads=3)
    with pytest.raises(ValueError, match="support quantiles"):
        LinearActMap.fit(torch.randn(8, 2), torch.randn(8, 2), support_quantiles=(0.9, 0.1))


def test_cli_fits_lineas_with_e2e_gates(tmp_path, tokenizer, monkeypatch):
    import steerwise.models
    from steerwise.cli import main

    model = make_model("qwen2")
    monkeypatch.setattr(steerwise.models, "load_model", lambda *a, **k: (model, tokenizer))
    files = {}
    for name, texts in (("s", SOURCE), ("c", CONTROL), ("t", TARGET)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(texts) + "\n")
    rc = main(["fit", "--model", "tiny", "--source", str(files["s"]),
               "--control", str(files["c"]), "--target", str(files["t"]),
               "--method", "lineas", "--gate", "e2e", "--e2e-gate", "relu",
               "--lineas-steps", "5", "--cv-folds", "3", "--l1", "0.1",
               "--out", str(tmp_path / "recipe")])
    assert rc == 0
    loaded = Recipe.from_pretrained(tmp_path / "recipe")
    assert loaded.method == "lineas" and loaded.gate == "e2e"
    assert loaded.entries[0].gate.activation == "relu"
    assert loaded.fit_info["training"]["steps"] == 5
