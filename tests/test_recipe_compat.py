"""Recipes saved by steerwise before the issue-19 refactor (tests/data/recipes_v0_1, made by
make.py there) load with today's code and steer to the logits stored beside them.

The tiny GPT-2's weights are stored beside them too (tiny-gpt2.safetensors, the seed-0
``make_model("gpt2")`` they were fitted on): random initialisation differs between transformers
releases, so the CI job on the lowest declared versions cannot rebuild the model from the seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file

from steerwise.recipe import Recipe

DATA = Path(__file__).parent / "data" / "recipes_v0_1"
RECIPES = ("caa-dsas", "linear-act")
STRENGTHS = (1.0, 2.0)


@pytest.fixture(scope="module")
def setup():
    with safe_open(str(DATA / "expected.safetensors"), "pt") as f:
        prompt = f.metadata()["prompt"]
    model = make_model("gpt2")
    missing, unexpected = model.load_state_dict(load_file(str(DATA / "tiny-gpt2.safetensors")),
                                                strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model, make_tokenizer(), prompt, load_file(str(DATA / "expected.safetensors"))


def _logits(model, tok, prompt, recipe=None, strength=1.0):
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        if recipe is None:
            return model(**ids).logits[0].float()
        with recipe.apply(model, strength):
            return model(**ids).logits[0].float()


def test_the_tiny_model_is_the_one_the_recipes_were_fitted_on(setup):
    model, tok, prompt, expected = setup
    torch.testing.assert_close(_logits(model, tok, prompt), expected["unsteered"],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", RECIPES)
def test_old_recipe_loads_and_steers_identically(setup, name):
    model, tok, prompt, expected = setup
    recipe = Recipe.from_pretrained(DATA / name)
    assert [e.site.layer for e in recipe.entries] == [1, 2]
    for s in STRENGTHS:
        got = _logits(model, tok, prompt, recipe, s)
        want = expected[f"{name}@{s:g}"]
        assert not torch.allclose(want, expected["unsteered"], atol=1e-4)  # it does steer
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_old_recipe_options_are_kept(setup):
    recipe = Recipe.from_pretrained(DATA / "linear-act")
    assert recipe.method == "linear-act" and recipe.gate == "none"
    assert all(e.map.support for e in recipe.entries)
    assert recipe.fit_info["options"]["map_options"] == {"support": True}
    dsas = Recipe.from_pretrained(DATA / "caa-dsas")
    assert dsas.fit_info["options"]["dsas"]["whiten"] is True
