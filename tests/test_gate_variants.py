"""Gate designs of issue 13: token activations, token-trained, contrastive and calibrated DSAS
gates, named gate variants and control pools in the sweep, and the cost-at-toxicity table."""

import json
import math

import pytest
import torch
from conftest import make_model, random_recipe

from steerwise import activations
from steerwise.activations import TOKEN_TEXT, collect_activations, pad_batch
from steerwise.eval.sweep import (
    SweepConfig,
    SweepData,
    costs_at_toxicity,
    crossing,
    run_sweep,
    summary_markdown,
)
from steerwise.fit import FitOptions, fit, gate_negatives
from steerwise.gates import DSASOptions, StepContext
from steerwise.gates.dsas import DSASGate, calibrate_gate
from steerwise.recipe import Recipe
from steerwise.sites import resolve_sites

TEXTS = ["apple pear banana fruit", "car bus", "the big red car was fast on the road"]


def test_token_pooling_keeps_every_real_token_but_the_sink(tokenizer):
    model = make_model("gpt2")
    sites = resolve_sites(model, "residual", [1])
    acts = collect_activations(model, tokenizer, TEXTS, sites, pooling=("tokens", "mean"),
                               progress=False)["residual.1"]
    lengths = [len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS]  # less the first token
    owner = acts[TOKEN_TEXT].flatten().long()
    assert acts["tokens"].shape == (sum(lengths), 32)
    assert [int((owner == i).sum()) for i in range(3)] == lengths
    for i, text in enumerate(TEXTS):
        ids, mask = pad_batch([tokenizer(text)["input_ids"]], 0, torch.device("cpu"))
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
        torch.testing.assert_close(acts["tokens"][owner == i], hs[1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(acts["tokens"][owner == i].mean(0), acts["mean"][i],
                                   rtol=1e-5, atol=1e-5)


def test_token_pooling_caps_tokens_per_text_evenly(tokenizer, monkeypatch):
    monkeypatch.setattr(activations, "MAX_TOKENS_PER_TEXT", 3)
    model = make_model("gpt2")
    sites = resolve_sites(model, "residual", [0])
    capped = collect_activations(model, tokenizer, TEXTS[2:], sites, pooling=("tokens",),
                                 progress=False)["residual.0"]
    assert capped["tokens"].shape[0] == 3
    ids, _ = pad_batch([tokenizer(TEXTS[2])["input_ids"]], 0, torch.device("cpu"))
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0][1:]
    # evenly spaced over the tokens after the sink: the second, a middle and the last token
    n = hs.shape[0]
    torch.testing.assert_close(capped["tokens"], hs[torch.linspace(0, n - 1, 3).round().long()],
                               rtol=1e-5, atol=1e-5)


def _domain_task(n: int = 200, seed: int = 0):
    """dim 0 = domain (source and target share it, control has the other), dim 1 = behaviour
    (source only)."""
    g = torch.Generator().manual_seed(seed)
    noise = lambda: torch.randn(n, 8, generator=g) * 0.5  # noqa: E731
    s, t, c = noise(), noise(), noise()
    s[:, 0] += 3.0
    t[:, 0] += 3.0
    c[:, 0] -= 3.0
    s[:, 1] += 2.0
    return s, t, c


def test_contrastive_gate_fires_on_the_behaviour_not_the_domain():
    s, t, c = _domain_task()
    held_s, held_t, held_c = _domain_task(seed=1)
    plain, _ = DSASGate.fit(s, c, DSASOptions(n_components=2))
    contrast, acc = DSASGate.fit(s, torch.cat([c, t]),
                                 DSASOptions(n_components=2, negatives="control+target"))
    ctx = StepContext()
    # the S-vs-C gate learned the domain: it opens on same-domain benign text
    assert plain(held_t, ctx).mean() > 0.5
    # S vs C ∪ T has to use the behaviour: shut on both kinds of benign text, open on S
    assert contrast(held_t, ctx).mean() < 0.2 and contrast(held_c, ctx).mean() < 0.2
    assert contrast(held_s, ctx).mean() > 0.8
    assert acc > 0.9  # balanced accuracy


def test_gate_negatives_joins_control_and_target_with_text_ids_apart():
    c = {"r.0": {"mean": torch.zeros(2, 3), "tokens": torch.zeros(5, 3),
                 TOKEN_TEXT: torch.tensor([[0.], [0.], [1.], [1.], [1.]])}}
    t = {"r.0": {"mean": torch.ones(3, 3), "tokens": torch.ones(4, 3),
                 TOKEN_TEXT: torch.tensor([[0.], [1.], [2.], [2.]])}}
    opts = FitOptions(dsas=DSASOptions(negatives="control+target"))
    joined = gate_negatives(c, t, opts)["r.0"]
    assert joined["mean"].shape == (5, 3) and joined["tokens"].shape == (9, 3)
    assert joined[TOKEN_TEXT].flatten().tolist() == [0, 0, 1, 1, 1, 2, 3, 4, 4]
    assert gate_negatives(c, t, FitOptions()) is c  # default: the control set alone
    assert gate_negatives(c, c, opts) is c  # a target that is the control is not counted twice


def test_calibration_puts_the_chosen_share_of_negatives_below_eps():
    s, _, c = _domain_task(n=400)
    gate, _ = DSASGate.fit(s, c, DSASOptions(n_components=2))
    before = gate(s, StepContext()).clone()
    info = calibrate_gate(gate, gate.logits(s), gate.logits(c), share=0.9, eps=0.05)
    gc, gs = gate(c, StepContext()), gate(s, StepContext())
    assert float((gc < 0.05).float().mean()) == pytest.approx(0.9, abs=0.005)
    assert float(gs.median()) == pytest.approx(0.95, abs=0.01)
    assert info["negatives_below_eps"] == pytest.approx(0.9, abs=0.005)
    # the ranking of tokens is kept (a positive temperature and a shift of one logit)
    assert info["calibration_scale"] > 0
    assert torch.equal(before.argsort(), gs.argsort())


@pytest.mark.parametrize("kwargs, message", [
    (dict(train_on="words"), "train_on"),
    (dict(negatives="target"), "negatives"),
    (dict(calibrate=1.5), "calibrate"),
    (dict(calibrate="maybe"), "calibrate"),
    (dict(calibrate=True), "calibrate"),
    (dict(calibrate_eps=0.7), "calibrate_eps"),
    (dict(n_components=0), "n_components"),
])
def test_bad_dsas_options_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DSASOptions(**kwargs)


def test_gates_are_calibrated_by_default_and_off_switches_it_off():
    """Calibration at 0.9 is the default since the Gemma 3 270M fronts (docs/dsas-measured.md);
    'off' (a flag, a sweep variant) or None gives the paper's gate as fitted; diffusion gates,
    which have no token pass, are never calibrated."""
    import argparse

    from steerwise.diffusion.fit import DiffusionFitOptions, _check
    from steerwise.eval.cli import parse_gate_variant
    from steerwise.fit import FitOptions
    from steerwise.gates.dsas import share_or_off

    assert DSASOptions().calibrate == FitOptions().dsas.calibrate == 0.9
    assert DSASOptions(calibrate="off").calibrate is None
    assert DSASOptions(calibrate=" None ").calibrate is None
    assert share_or_off("OFF") is None and share_or_off("0.8") == 0.8
    for bad in ("1", "0", "nan", "most"):
        with pytest.raises(argparse.ArgumentTypeError, match="share in \\(0, 1\\) or 'off'"):
            share_or_off(bad)
    _, variant = parse_gate_variant("paper=dsas,calibrate=off")
    assert FitOptions().updated(variant["fit_options"]).dsas.calibrate is None
    assert DiffusionFitOptions().dsas.calibrate is None
    assert _check(DiffusionFitOptions(dsas=DSASOptions(threshold=0.5))).calibrate is None


def test_fit_token_contrastive_calibrated_gate_end_to_end(tokenizer, tmp_path):
    from test_fit import FRUIT, OTHER, sentences

    model = make_model("llama")
    src = [s + " bad" for s in sentences(FRUIT, 16, 0)]
    tgt = sentences(FRUIT, 16, 2)
    ctl = sentences(OTHER, 16, 1)
    opts = DSASOptions(train_on="tokens", negatives="control+target", calibrate=0.8,
                       whiten=True, threshold=0.0)
    recipe = fit(model, tokenizer, src, ctl, target=tgt, progress=False, dsas=opts)
    for e in recipe.entries:
        assert 0.0 <= e.diagnostics["gate_accuracy"] <= 1.0
        assert 0.8 <= e.diagnostics["negatives_below_eps"] <= 0.85
    assert recipe.fit_info["options"]["dsas"]["negatives"] == "control+target"
    recipe.save_pretrained(tmp_path / "r")
    again = Recipe.from_pretrained(tmp_path / "r")
    x = torch.randn(5, 32)
    for a, b in zip(recipe.entries, again.entries):
        torch.testing.assert_close(a.gate(x, StepContext()), b.gate(x, StepContext()))


# ---- the sweep: variants, control pools, costs --------------------------------------------------
def _data() -> SweepData:
    return SweepData(toxic_prompts=["the dog"], source_pool=[f"s{i}" for i in range(8)],
                     target_pool=[f"t{i}" for i in range(8)],
                     control_pool=[f"c{i}" for i in range(8)],
                     control_pools={"wiki": [f"w{i}" for i in range(8)]})


def test_sweep_fits_each_variant_with_its_options_and_control_pool(tmp_path, tokenizer):
    from steerwise.eval.cli import parse_gate_variant

    variants = dict(parse_gate_variant(v) for v in [
        "tok=dsas,train_on=tokens,threshold=0.6,control=wiki",
        "relu=e2e,lineas.e2e_gate=relu,lineas.steps=5"])
    assert variants["tok"] == {"gate": "dsas", "control": "wiki",
                               "fit_options": {"dsas": {"train_on": "tokens", "threshold": 0.6}}}
    cfg = SweepConfig(methods=["caa"], gates=["dsas", "tok", "relu"], gate_variants=variants,
                      strengths={"caa": [0, 1]}, seeds=[0], n_fit=4)
    model = make_model("qwen2")
    seen = {}

    def fake_fit(model, tok, source, control, target, opts, progress=False):
        seen[(opts.gate, opts.dsas.train_on, opts.e2e.activation)] = (opts, control)
        return random_recipe(model)

    def fake_eval(model, tok, data, scorer, config, recipe, strength, seed):
        return {"toxicity": 0.3 - 0.1 * strength, "ppl": 10 + strength}

    points = run_sweep(model, tokenizer, _data(), cfg, tmp_path, scorer=None, progress=False,
                       log=lambda s: None, fit_fn=fake_fit, eval_fn=fake_eval)
    assert {p["gate"] for p in points} == {"none", "dsas", "tok", "relu"}
    opts, control = seen[("dsas", "tokens", "sigmoid")]
    assert opts.dsas.threshold == 0.6 and all(c.startswith("w") for c in control)
    opts, control = seen[("dsas", "means", "sigmoid")]
    assert opts.dsas.threshold == 0.75 and all(c.startswith("c") for c in control)
    opts, _ = seen[("e2e", "means", "relu")]
    assert opts.lineas.steps == 5
    # a variant redefined under the same name is refused on resume
    changed = dict(variants, tok={"gate": "dsas", "fit_options": {}})
    with pytest.raises(ValueError, match="gate variant 'tok'"):
        run_sweep(model, tokenizer, _data(), SweepConfig(**{**cfg.__dict__,
                                                            "gate_variants": changed}),
                  tmp_path, scorer=None, progress=False, log=lambda s: None, fit_fn=fake_fit,
                  eval_fn=fake_eval)
    # an unknown control pool fails before any work, naming the ones there are
    bad = {"x": {"gate": "dsas", "control": "nope"}}
    with pytest.raises(ValueError, match="unknown control pool 'nope'; this data has: wiki"):
        run_sweep(model, tokenizer, _data(), SweepConfig(
            methods=["caa"], gates=["x"], gate_variants=bad, strengths={"caa": [0, 1]},
            seeds=[0], n_fit=4), tmp_path / "b", scorer=None, progress=False,
            log=lambda s: None, fit_fn=fake_fit, eval_fn=fake_eval)
    assert not (tmp_path / "b" / "points.jsonl").exists()


def test_variants_fit_from_named_source_and_target_pools(tmp_path, tokenizer):
    """source=/target= draw a variant's fit sets from the data's named pools (the in-domain
    design: toxic RTP prompts against non-toxic RTP text), for a gate and for no gate alike; a
    sweep written before those pools existed still resumes; an unknown pool fails first."""
    from steerwise.eval.cli import parse_gate_variant

    data = _data()
    data.source_pools = {"rtp": [f"rs{i}" for i in range(8)]}
    data.target_pools = {"rtp": [f"rt{i}" for i in range(8)]}
    variants = dict(parse_gate_variant(v) for v in [
        "ind=dsas,source=rtp,target=rtp,control=wiki", "ind0=none,source=rtp,target=rtp"])
    assert variants["ind"] == {"gate": "dsas", "control": "wiki", "source": "rtp",
                               "target": "rtp", "fit_options": {}}
    model = make_model("qwen2")
    seen = {}

    def fake_fit(model, tok, source, control, target, opts, progress=False):
        seen[opts.gate, source[0][0]] = (source, target, control)
        return random_recipe(model)

    def fake_eval(model, tok, data, scorer, config, recipe, strength, seed):
        return {"toxicity": 0.3 - 0.1 * strength, "ppl": 10 + strength}

    kw = {"scorer": None, "progress": False, "log": lambda s: None, "fit_fn": fake_fit,
          "eval_fn": fake_eval}
    # the sweep first ran without the named pools (as before they existed)
    plain = SweepConfig(methods=["caa"], gates=["dsas"], strengths={"caa": [0, 1]}, seeds=[0],
                        n_fit=4)
    run_sweep(model, tokenizer, _data(), plain, tmp_path, **kw)
    cfg = SweepConfig(**{**plain.__dict__, "gates": ["dsas", "ind", "ind0"],
                         "gate_variants": variants})
    points = run_sweep(model, tokenizer, data, cfg, tmp_path, **kw)
    assert {p["gate"] for p in points} == {"none", "dsas", "ind", "ind0"}
    src, tgt, ctl = seen["dsas", "r"]
    assert all(x.startswith("rs") for x in src) and all(x.startswith("rt") for x in tgt)
    assert all(x.startswith("w") for x in ctl)
    src, tgt, ctl = seen["none", "r"]
    assert all(x.startswith("rs") for x in src) and all(x.startswith("c") for x in ctl)
    assert all(x.startswith("s") for x in seen["dsas", "s"][0])  # the plain gate: defaults
    bad = {"x": {"gate": "dsas", "source": "nope"}}
    with pytest.raises(ValueError, match="unknown source pool 'nope'; this data has: rtp"):
        run_sweep(model, tokenizer, data, SweepConfig(
            methods=["caa"], gates=["x"], gate_variants=bad, strengths={"caa": [0, 1]},
            seeds=[0], n_fit=4), tmp_path / "b", **kw)
    assert not (tmp_path / "b" / "points.jsonl").exists()


@pytest.mark.parametrize("spec, message", [
    ("tok", "NAME=KIND"), ("tok=foo", "unknown gate kind"), ("tok=dsas,bogus=1", "bogus"),
    ("tok=dsas,train_on", "key=value"), ("tok=dsas,nosuch.x=1", "nosuch"),
])
def test_bad_gate_variant_specs_fail_clearly(spec, message):
    from steerwise.eval.cli import parse_gate_variant

    with pytest.raises(ValueError, match=message):
        parse_gate_variant(spec)


def _pt(gate, seed, s, tox, ppl, ppl_nt, benign):
    return {"method": "base" if s == 0 else "caa", "gate": "none" if s == 0 else gate,
            "seed": seed, "strength": s, "toxicity": tox, "ppl": ppl, "ppl_nontoxic": ppl_nt,
            "benign_toxicity": benign}


def test_costs_at_toxicity_read_where_the_lambda_path_crosses():
    points = [_pt("g", 0, 0, 0.40, 10.0, 20.0, 0.2), _pt("g", 1, 0, 0.40, 10.0, 20.0, 0.2),
              _pt("g", 0, 1, 0.20, 11.0, 22.0, 0.1), _pt("g", 1, 1, 0.20, 11.0, 22.0, 0.1),
              _pt("g", 0, 2, 0.00, 13.0, 30.0, 0.0), _pt("g", 1, 2, 0.10, 13.0, 30.0, 0.0)]
    # seed-mean curve: (λ 0: .40, 20), (1: .20, 22), (2: .05, 30): 5 % reached exactly at λ=2
    at = crossing([{"strength": 0, "toxicity": 0.4, "ppl": 1.0}, {"strength": 2,
                   "toxicity": 0.0, "ppl": 3.0}], 0.1)
    assert at["strength"] == pytest.approx(1.5) and at["ppl"] == pytest.approx(2.5)
    assert crossing([{"strength": 1, "toxicity": 0.3}], 0.1) is None
    costs = {(c["gate"], c["toxicity_target"]): c for c in costs_at_toxicity(points)}
    c5 = costs[("g", 0.05)]
    assert c5["strength"] == pytest.approx(2.0)
    assert c5["ppl_nontoxic_increase"] == pytest.approx(0.5)
    assert c5["ppl_increase"] == pytest.approx(0.3)
    assert c5["benign_toxicity"] == pytest.approx(0.0) and c5["benign_toxicity_base"] == 0.2
    # seed 0 crosses 5 % at λ = 1.75 (ppl_nt 28), seed 1 never does
    assert c5["n_seeds_reached"] == 1 and c5["n_seeds"] == 2
    assert "ppl_nontoxic_increase_std" not in c5
    c1 = costs[("g", 0.01)]
    assert not c1["reached"] and "ppl_nontoxic_increase" not in c1
    md = summary_markdown([], [], costs_at_toxicity(points))
    assert "| caa | g | 5 % | 2 | +50.0 | +30.0 | 0.0 (20.0) |" in md
    assert "| caa | g | 1 % | – | – | – | – |" in md
    assert not math.isnan(json.loads(json.dumps(c5))["ppl_increase"])


def test_per_gate_grids(tmp_path, tokenizer):
    from steerwise.eval.cli import parse_grids

    g = parse_grids(["caa=2,4", "caa+none=0.1,0.2"], ["caa"], ["none", "dsas"])
    assert g == {"caa": [0.0, 2.0, 4.0], "caa+none": [0.0, 0.1, 0.2]}
    with pytest.raises(ValueError, match="gate 'tok'"):
        parse_grids(["caa+tok=1"], ["caa"], ["none"])
    cfg = SweepConfig(methods=["caa"], gates=["none", "dsas"], strengths=g, seeds=[0], n_fit=4)
    points = run_sweep(make_model("qwen2"), tokenizer, _data(), cfg, tmp_path, scorer=None,
                       progress=False, log=lambda s: None,
                       fit_fn=lambda *a, **k: random_recipe(a[0]),
                       eval_fn=lambda *a: {"toxicity": 0.1})
    assert sorted((p["gate"], p["strength"]) for p in points if p["method"] == "caa") == [
        ("dsas", 2.0), ("dsas", 4.0), ("none", 0.1), ("none", 0.2)]


# ---- the prefix-mean gate: trained on text means, applied on causal prefix means --------------
def _prefix_recipe(model):
    recipe = random_recipe(model, scale=20.0)
    for e in recipe.entries:
        e.gate.apply_on = "prefix-mean"
    return recipe


def test_prefix_mean_gate_reads_the_mean_of_the_sequence_so_far():
    gate = DSASGate(torch.tensor([1.0, -2.0]), torch.tensor(0.5), apply_on="prefix-mean")
    t = torch.tensor([[[1.0, 0.0], [3.0, 1.0], [0.0, 0.0]]])
    ctx = StepContext(attention_mask=torch.tensor([[0, 1, 1]]))  # left padding
    z = t @ gate.weight
    want = torch.sigmoid(torch.stack([torch.tensor(0.0), z[0, 1], (z[0, 1] + z[0, 2]) / 2]) + 0.5)
    torch.testing.assert_close(gate(t, ctx)[0, 1:], want[1:])
    # a decode step continues the sums: the mean now covers three real tokens
    step = StepContext(attention_mask=torch.tensor([[1]]), is_prefill=False, state=ctx.state)
    nxt = torch.tensor([[[2.0, 2.0]]])
    mean3 = (z[0, 1] + z[0, 2] + nxt[0, 0] @ gate.weight) / 3
    torch.testing.assert_close(gate(nxt, step)[0, 0], torch.sigmoid(mean3 + 0.5))
    assert gate.linear_form().kind == "external"
    with pytest.raises(ValueError, match="apply_on"):
        DSASGate(torch.zeros(2), torch.zeros(()), apply_on="words")


def test_prefix_mean_gate_cached_generation_equals_full_recompute_and_padding():
    from test_hooks import IDS, _generate, assert_padded_batch_equals_rows_alone, logits

    model = make_model("qwen2")
    recipe = _prefix_recipe(model)
    ids = torch.tensor([IDS[0]])
    with recipe.apply(model, 1.5):
        seq, step_logits = _generate(model, ids, torch.ones_like(ids))
        full = logits(model, seq)
    torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
    assert_padded_batch_equals_rows_alone(model, recipe)
    with torch.no_grad():
        plain = logits(model, seq)
    assert not torch.allclose(plain, full, atol=1e-3)  # it does steer


def test_prefix_mean_recipe_round_trips_and_is_refused_by_the_server(tmp_path):
    from steerwise.server.engine import refuse_unbatchable

    model = make_model("qwen2")
    recipe = _prefix_recipe(model)
    recipe.save_pretrained(tmp_path / "r")
    again = Recipe.from_pretrained(tmp_path / "r")
    assert all(e.gate.apply_on == "prefix-mean" for e in again.entries)
    with pytest.raises(ValueError, match="per-batch state"):
        refuse_unbatchable("r", again)


def test_projected_token_collection_keeps_only_the_dot_products(tokenizer):
    model = make_model("gpt2")
    sites = resolve_sites(model, "residual", [0, 2])
    w = {"residual.2": torch.randn(32, 1)}
    full = collect_activations(model, tokenizer, TEXTS, sites, pooling=("tokens",),
                               progress=False)
    proj = collect_activations(model, tokenizer, TEXTS, sites, pooling=("tokens",),
                               progress=False, project=w)
    assert proj["residual.2"]["tokens"].shape == (full["residual.2"]["tokens"].shape[0], 1)
    torch.testing.assert_close(proj["residual.2"]["tokens"], full["residual.2"]["tokens"] @ w[
        "residual.2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(proj["residual.0"]["tokens"], full["residual.0"]["tokens"])
