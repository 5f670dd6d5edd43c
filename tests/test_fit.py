"""fit(): texts → recipe, on a tiny random model; bad input gives clear errors."""

import random
import warnings

import pytest
import torch

from conftest import make_model
from steerwise.activations import collect_activations, pad_batch
from steerwise.fit import fit
from steerwise.gates import DSASOptions
from steerwise.sites import resolve_sites

FRUIT = "apple pear banana fruit sweet ripe".split()
OTHER = "car bus train road fast wheel dog cat bird rain snow".split()


def sentences(words, n, seed):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(12, 16))) for _ in range(n)]


@pytest.fixture(scope="module")
def fitted():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    model = make_model("llama")
    src, ctl = sentences(FRUIT, 24, 0), sentences(OTHER, 24, 1)
    # Random tiny models have activations of size ~0.01, where C=1 regularises an unwhitened
    # regression to chance; whitening makes the gate scale-free.
    recipe = fit(model, tok, src, ctl, progress=False, dsas=DSASOptions(whiten=True),
                 default_strength=1.0)  # the whole sets (no text held out for --strength auto)
    return model, tok, recipe


def test_fit_produces_accurate_gates_that_fire_on_source_only(fitted):
    model, tok, recipe = fitted
    accs = [e.diagnostics["gate_accuracy"] for e in recipe.entries]
    assert min(accs) >= 0.9
    assert recipe.fit_info["n_source"] == 24 and recipe.fit_info["target_is_control"]
    held_src, held_ctl = sentences(FRUIT, 10, 7), sentences(OTHER, 10, 8)
    sites = recipe.sites
    acts_s = collect_activations(model, tok, held_src, sites, progress=False)
    acts_c = collect_activations(model, tok, held_ctl, sites, progress=False)
    from steerwise.gates import StepContext

    for e in recipe.entries:
        gs = e.gate(acts_s[e.site.name]["mean"], StepContext())
        gc = e.gate(acts_c[e.site.name]["mean"], StepContext())
        assert gs.mean() > 0.75 and gc.mean() < 0.25
        correct = (gs > 0.5).float().mean() + (gc < 0.5).float().mean()
        assert correct / 2 >= 0.9


def test_caa_vector_is_the_difference_of_pooled_means(fitted):
    model, tok, recipe = fitted
    src, ctl = sentences(FRUIT, 24, 0), sentences(OTHER, 24, 1)
    acts_s = collect_activations(model, tok, src, recipe.sites, progress=False)
    acts_c = collect_activations(model, tok, ctl, recipe.sites, progress=False)
    for e in recipe.entries:
        expected = acts_c[e.site.name]["mean"].mean(0) - acts_s[e.site.name]["mean"].mean(0)
        torch.testing.assert_close(e.map.vector, expected)


def test_padding_never_enters_pooled_statistics(tokenizer):
    model = make_model("gpt2")
    sites = resolve_sites(model, "residual", [1])
    texts = ["apple pear", "the big red car was fast on the road"]
    together = collect_activations(model, tokenizer, texts, sites, pooling=("mean", "last"),
                                   progress=False)
    for i, t in enumerate(texts):
        alone = collect_activations(model, tokenizer, [t], sites, pooling=("mean", "last"),
                                    progress=False)
        for how in ("mean", "last"):
            torch.testing.assert_close(together["residual.1"][how][i], alone["residual.1"][how][0],
                                       rtol=1e-5, atol=1e-5)


def test_mean_pooling_matches_a_manual_masked_mean(tokenizer):
    """The mean over each text's real tokens less its first one (the attention sink); with
    ``sink_free=False`` over every real token (the statistics of older recipes)."""
    model = make_model("qwen2")
    sites = resolve_sites(model, "residual", [0])
    texts = ["apple pear banana", "car bus"]
    acts = collect_activations(model, tokenizer, texts, sites, progress=False)
    with_sink = collect_activations(model, tokenizer, texts, sites, progress=False,
                                    sink_free=False)
    ids, mask = pad_batch(tokenizer(texts)["input_ids"], 0, torch.device("cpu"))
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    for i in range(2):
        real = hs[i][mask[i].bool()]
        torch.testing.assert_close(acts["residual.0"]["mean"][i], real[1:].mean(0), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(with_sink["residual.0"]["mean"][i], real.mean(0), rtol=1e-5,
                                   atol=1e-5)


def test_no_gate_fit_steers_uniformly(tokenizer):
    model = make_model("gpt_neox")
    recipe = fit(model, tokenizer, sentences(FRUIT, 6, 0), target=sentences(OTHER, 6, 1),
                 gate="none", layers="1-2", progress=False)
    assert [e.site.layer for e in recipe.entries] == [1, 2]
    assert all(e.gate.kind == "none" and e.scale == 1.0 for e in recipe.entries)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(source=[], control=["a car"] * 6), ValueError, "source set is empty"),
        (dict(source=["apple"] * 6, control=["car", ""] * 3), ValueError, "control text #1 is empty"),
        (dict(source=["apple"] * 6), ValueError, "give a target set"),
        (dict(source=["apple"] * 6, target=["car"] * 6), ValueError, "needs a control set"),
        (dict(source=["apple"] * 3, control=["car"] * 6), ValueError, "too little data"),
        (dict(source="apple pear", control=["car"] * 6), TypeError, "not one string"),
        (dict(source=["apple"] * 6, control=["car"] * 6, method="nope"), ValueError, "unknown method"),
        (dict(source=["apple"] * 6, control=["car"] * 6, gate="nope"), ValueError, "unknown gate"),
        (dict(source=["apple"] * 6, control=["car"] * 8, site="nope"), ValueError, "valid choices"),
        (dict(source=["apple"] * 6, control=["car"] * 6, bogus=1), TypeError, "unknown fit option"),
    ],
)
def test_bad_input_fails_clearly(tokenizer, kwargs, error, message):
    model = make_model("qwen2")
    with pytest.raises(error, match=message):
        fit(model, tokenizer, progress=False, **kwargs)


def test_one_class_looking_data_warns_that_dsas_degrades(tokenizer):
    model = make_model("qwen2")
    same = sentences(FRUIT, 12, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = fit(model, tokenizer, same, list(same), progress=False,
                     dsas=DSASOptions(cv_folds=3))
    assert "warning" in recipe.fit_info
    assert any("chance" in str(w.message) or "nothing will be steered" in str(w.message)
               for w in caught)
