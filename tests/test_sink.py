"""The attention sink (each text's first real token) stays out of every fitted statistic.

The sink is a *position*, the first one whose attention mask is 1 (the tiny models' tokenizer
adds no BOS, so here it is the first word). The tests overwrite that position's activation at
the fitted site with a huge vector — what a real model's sink looks like — and check that no
statistic moves: pooled means, last tokens and token rows, and every fitted map and gate (CAA,
AcT supports, ITI, DSAS incl. token training and calibration, CAST, LinEAS + E2E training).
"""

from contextlib import contextmanager

import pytest
import torch

from conftest import make_model
from steerwise.activations import (
    TOKEN_TEXT,
    collect_activations,
    drop_first_token,
    forward_kwargs,
    pool,
    statistics_mask,
    token_rows,
)
from steerwise.fit import fit
from steerwise.gates import DSASOptions
from steerwise.gates.e2e import E2EOptions
from steerwise.maps.lineas import LinEASOptions
from steerwise.recipe import Recipe
from steerwise.sites import resolve_sites

TEXTS = ["apple pear banana fruit", "car bus", "the big red car was fast on the road",
         "dog cat bird"]
FRUIT = ("apple pear banana fruit sweet ripe apple ripe pear sweet banana fruit",
         "sweet ripe fruit apple pear banana sweet ripe",
         "pear banana apple fruit ripe sweet fruit pear",
         "banana fruit sweet apple",
         "ripe pear apple sweet banana fruit ripe apple pear")
OTHER = ("car bus train road fast wheel dog cat",
         "bird rain snow sun cold warm sky music song band sport",
         "ball game red green big small car bus train road",
         "dog cat bird rain",
         "snow sun cold warm sky music song")
SOURCE = [f"{a} {b}" for a in FRUIT for b in FRUIT[:3]]  # 15 texts of varied length
CONTROL = [f"{a} {b}" for a in OTHER for b in OTHER[:3]]


@contextmanager
def sink_overwritten(model, site, value: float = 1e4, seed: int = 0):
    """Overwrite each row's first real position at ``site`` (the module's output) with a huge
    random vector, before any other hook of that module sees it; a no-op when ``value`` is 0."""
    seen: dict[str, torch.Tensor] = {}
    d = model.config.hidden_size
    vec = torch.randn(d, generator=torch.Generator().manual_seed(seed)) * value

    def remember(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen["mask"] = mask if mask is not None else torch.ones_like(ids)

    def overwrite(module, args, output):
        x = output if isinstance(output, torch.Tensor) else output[site.tuple_index or 0]
        mask = seen["mask"]
        first = (mask != 0).int().argmax(1)
        x[torch.arange(x.shape[0]), first] = vec.to(x.dtype)

    handles = [model.register_forward_pre_hook(remember, with_kwargs=True)]
    if value:
        handles.append(model.get_submodule(site.module).register_forward_hook(overwrite))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _collect(model, tokenizer, sites, texts=TEXTS, **kw):
    return collect_activations(model, tokenizer, texts, sites, progress=False,
                               pooling=("mean", "last", "tokens"), **kw)


def test_drop_first_token_with_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
    assert torch.equal(drop_first_token(mask), expected)
    assert torch.equal(drop_first_token(mask.bool()), expected.bool())
    assert torch.equal(statistics_mask(mask, False), mask)


def test_pooled_statistics_ignore_the_first_tokens_activation(tokenizer):
    model = make_model("llama")
    sites = resolve_sites(model, "residual", [1])
    plain = _collect(model, tokenizer, sites)["residual.1"]
    with sink_overwritten(model, sites[0]):
        moved = _collect(model, tokenizer, sites)["residual.1"]
        with_sink = _collect(model, tokenizer, sites, sink_free=False)["residual.1"]
    for how in ("mean", "last", "tokens", TOKEN_TEXT):
        torch.testing.assert_close(moved[how], plain[how], rtol=0, atol=0)
    assert plain["tokens"].abs().max() < 100
    # the overwrite is real: statistics that keep the first token do move
    assert with_sink["mean"].abs().max() > 100
    assert with_sink["tokens"].abs().max() > 100


def test_token_rows_and_means_of_a_left_padded_batch_equal_each_row_alone(tokenizer):
    model = make_model("qwen2")
    sites = resolve_sites(model, "residual", [2])
    together = _collect(model, tokenizer, sites)["residual.2"]
    owner = together[TOKEN_TEXT].flatten().long()
    for i, text in enumerate(TEXTS):
        alone = _collect(model, tokenizer, sites, texts=[text])["residual.2"]
        for how in ("mean", "last"):
            torch.testing.assert_close(together[how][i], alone[how][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(together["tokens"][owner == i], alone["tokens"],
                                   rtol=1e-5, atol=1e-5)


def test_right_padding_never_enters_and_the_sink_is_the_first_real_position(tokenizer):
    """A right-padded batch (pad ids after the text) pools as each row alone."""
    model = make_model("gpt2")
    rows = [tokenizer(t)["input_ids"] for t in TEXTS]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        hs = model(**forward_kwargs(model, ids, mask), output_hidden_states=True).hidden_states[2]
        m = statistics_mask(mask, True)
        means, lasts = pool(hs, m, "mean"), pool(hs, m, "last")
        toks, owner = token_rows(hs, m, 64)
        for i, r in enumerate(rows):
            alone = model(input_ids=torch.tensor([r]), output_hidden_states=True).hidden_states[2][0]
            torch.testing.assert_close(means[i], alone[1:].mean(0), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lasts[i], alone[-1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(toks[owner == i], alone[1:], rtol=1e-5, atol=1e-5)


def test_left_truncation_drops_the_first_position_of_what_is_kept(tokenizer):
    """A text cut to ``max_length`` keeps its last tokens; the first of those is the model's
    first position, hence its sink, and stays out."""
    model = make_model("llama")
    sites = resolve_sites(model, "residual", [0])
    text = TEXTS[2]
    with pytest.warns(UserWarning, match="truncated"):
        acts = collect_activations(model, tokenizer, [text], sites, max_length=4,
                                   progress=False)["residual.0"]
    kept = tokenizer(text)["input_ids"][-4:]
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([kept]), output_hidden_states=True).hidden_states[1][0]
    torch.testing.assert_close(acts["mean"][0], hs[1:].mean(0), rtol=1e-5, atol=1e-5)


def test_a_single_token_text_is_refused_with_its_index_and_set(tokenizer):
    model = make_model("gpt2")
    sites = resolve_sites(model, "residual", [0])
    with pytest.raises(ValueError, match=r"text #1 of the control set has a single token"):
        collect_activations(model, tokenizer, ["apple pear", "car"], sites, desc="control",
                            progress=False)
    # the old statistics (with the first token) still take it
    out = collect_activations(model, tokenizer, ["apple pear", "car"], sites, progress=False,
                              sink_free=False)
    assert out["residual.0"]["mean"].shape == (2, 32)
    with pytest.raises(ValueError, match=r"text #2 of the source set has a single token"):
        fit(model, tokenizer, ["apple pear", "pear apple", "banana"], ["car bus", "bus car"],
            gate="none", layers=[0], default_strength=1.0, progress=False)
    with pytest.raises(ValueError, match=r"text #1 of the control set has a single token"):
        fit(model, tokenizer, ["apple pear", "pear apple"], ["car bus", "bus"], gate="none",
            layers=[0], default_strength=1.0, progress=False)  # the control set is the target


FITS = {
    "caa+dsas+calibrate": dict(method="caa", gate="dsas",
                               dsas=DSASOptions(whiten=True, cv_folds=3, calibrate=0.5)),
    "caa+dsas-tokens": dict(method="caa", gate="dsas",
                            dsas=DSASOptions(whiten=True, cv_folds=3, train_on="tokens")),
    "linear-act+dsas-adaptive": dict(method="linear-act", gate="dsas-adaptive",
                                     dsas=DSASOptions(whiten=True, cv_folds=3)),
    "mean-act+none": dict(method="mean-act", gate="none",
                               map_options={"support": True}),
    "iti+cast": dict(method="iti", gate="cast"),
    "lineas+e2e": dict(method="lineas", gate="e2e", dsas=DSASOptions(whiten=True, cv_folds=3),
                       lineas=LinEASOptions(steps=4, batch_size=4), e2e=E2EOptions(gamma=1.0)),
}


def _state(recipe: Recipe) -> dict[str, torch.Tensor]:
    out = {}
    for e in recipe.entries:
        for part, module in (("map", e.map), ("gate", e.gate)):
            for k, v in module.state_dict().items():
                out[f"{e.site.name}.{part}.{k}"] = v
        out[f"{e.site.name}.scale"] = torch.tensor(float(e.scale))
    return out


@pytest.mark.parametrize("name", sorted(FITS))
def test_fitted_maps_and_gates_ignore_the_first_tokens_activation(tokenizer, name):
    model = make_model("llama")
    site = resolve_sites(model, "residual", [1])[0]
    kw = dict(FITS[name], layers=[1], probe_accuracy=False, progress=False)
    plain = fit(model, tokenizer, SOURCE, CONTROL, **kw)
    assert plain.fit_info["statistics"] == {"first_token": "excluded"}
    assert plain.fit_info["options"]["sink_free"] is True
    with sink_overwritten(model, site):
        moved = fit(model, tokenizer, SOURCE, CONTROL, **kw)
    a, b = _state(plain), _state(moved)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    if name.startswith("linear-act"):  # AcT's support is a statistic too: finite and unmoved
        assert torch.isfinite(a["residual.1.map.lo"]).all()


def test_sink_free_false_reproduces_the_old_caa_vector(tokenizer, tmp_path):
    model = make_model("llama")
    sites = resolve_sites(model, "residual", [1])
    with sink_overwritten(model, sites[0]):
        old = fit(model, tokenizer, SOURCE, CONTROL, method="caa", gate="none", layers=[1],
                  sink_free=False, probe_accuracy=False, default_strength=1.0, progress=False)
        new = fit(model, tokenizer, SOURCE, CONTROL, method="caa", gate="none", layers=[1],
                  probe_accuracy=False, default_strength=1.0, progress=False)
        s = collect_activations(model, tokenizer, SOURCE, sites, progress=False, sink_free=False)
        c = collect_activations(model, tokenizer, CONTROL, sites, progress=False, sink_free=False)
    expected = c["residual.1"]["mean"].mean(0) - s["residual.1"]["mean"].mean(0)
    torch.testing.assert_close(old.entries[0].map.vector, expected)
    # with the sink in, the vector is mostly the length difference times the sink
    assert old.entries[0].map.vector.norm() > 10 * new.entries[0].map.vector.norm()
    assert old.fit_info["statistics"] == {"first_token": "included"}
    old.save_pretrained(tmp_path / "old")
    again = Recipe.from_pretrained(tmp_path / "old")
    assert again.fit_info["statistics"] == {"first_token": "included"}
    assert again.fit_info["options"]["sink_free"] is False


# ---- statistics the gates take at run time follow the fit: no sink in their means ----------
def test_prefix_mean_gate_of_a_sink_free_fit_leaves_the_first_token_out(tmp_path):
    from steerwise.gates import StepContext
    from steerwise.gates.dsas import DSASGate

    gate = DSASGate(torch.tensor([1.0, -2.0]), torch.tensor(0.5), apply_on="prefix-mean",
                    sink_free=True)
    t = torch.tensor([[[0.0, 0.0], [9e3, -9e3], [3.0, 1.0], [1.0, 0.0]]])
    ctx = StepContext(attention_mask=torch.tensor([[0, 1, 1, 1]]))  # left padding
    z = t @ gate.weight
    out = gate(t, ctx)[0]
    torch.testing.assert_close(out[2:], torch.sigmoid(torch.stack([z[0, 2], (z[0, 2] + z[0, 3]) / 2])
                                                      + 0.5))
    t2 = t.clone()
    t2[0, 1] = torch.tensor([-5e3, 7e3])  # another sink: nothing after it moves
    torch.testing.assert_close(gate(t2, StepContext(attention_mask=ctx.attention_mask))[0, 2:],
                               out[2:])
    # a decode step continues the sums without the sink
    step = StepContext(attention_mask=torch.tensor([[1]]), is_prefill=False, state=ctx.state)
    nxt = torch.tensor([[[2.0, 2.0]]])
    mean3 = (z[0, 2] + z[0, 3] + nxt[0, 0] @ gate.weight) / 3
    torch.testing.assert_close(gate(nxt, step)[0, 0], torch.sigmoid(mean3 + 0.5))
    # the flag round-trips; a config without it (older recipes) keeps the sink in the mean
    assert DSASGate.empty(2, gate.config()).sink_free is True
    old = DSASGate.empty(2, {"apply_on": "prefix-mean"})
    assert old.sink_free is False


def test_fitted_prefix_mean_and_cast_gates_are_sink_free_and_old_configs_are_not(tokenizer,
                                                                                 tmp_path):
    from steerwise.gates.cast import CASTGate

    model = make_model("llama")
    kw = dict(layers=[1], probe_accuracy=False, progress=False)
    dsas = fit(model, tokenizer, SOURCE, CONTROL, gate="dsas",
               dsas=DSASOptions(whiten=True, cv_folds=3, apply_on="prefix-mean"), **kw)
    assert dsas.entries[0].gate.sink_free is True
    assert dsas.entries[0].gate.config()["sink_free"] is True
    cast = fit(model, tokenizer, SOURCE, CONTROL, gate="cast", **kw)
    cond = cast.entries[0].gate
    assert cond.role == "condition" and cond.sink_free and cond.config()["sink_free"] is True
    old = fit(model, tokenizer, SOURCE, CONTROL, gate="cast", sink_free=False, **kw)
    assert old.entries[0].gate.sink_free is False
    cfg = {k: v for k, v in cond.config().items() if k != "sink_free"}
    assert CASTGate.empty(32, cfg).sink_free is False
    for name, recipe in (("dsas", dsas), ("cast", cast), ("old", old)):
        recipe.save_pretrained(tmp_path / name)
        again = Recipe.from_pretrained(tmp_path / name)
        assert again.entries[0].gate.sink_free is recipe.entries[0].gate.sink_free


def test_cast_decision_ignores_the_first_tokens_activation():
    from steerwise.gates import StepContext
    from steerwise.gates.cast import CASTGate, cast_similarity

    g = torch.Generator().manual_seed(0)
    vector = torch.randn(8, generator=g)
    x = torch.randn(4, 6, 8, generator=g)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]])
    gate = CASTGate("condition", vector=vector, threshold=0.0, sink_free=True)
    first = (mask != 0).int().argmax(1)
    moved = x.clone()
    moved[torch.arange(4), first] = vector * 1e4 * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]
    a = gate.decide(x, StepContext(attention_mask=mask))
    b = gate.decide(moved, StepContext(attention_mask=mask))
    # rows with tokens after the sink decide alike; a one-token prompt reads its only token
    assert torch.equal(a[:3], b[:3])
    sims = []
    for i in range(3):
        h = x[i, first[i] + 1:][mask[i, first[i] + 1:].bool()].mean(0)
        c = vector / vector.norm()
        p = torch.tanh((h @ c) * c)
        sims.append(float(h @ p / (h.norm() * p.norm())))
    assert a[:3].tolist() == [float(s > 0.0) for s in sims]
    assert b[3] == float(cast_similarity(moved[3, 5], vector) > 0.0)
