"""Steered generation: traces, renderings, errors."""

import pytest
import torch

from conftest import make_model, random_recipe
from steerwise.generate import PromptTooLongError, generate


def test_generation_with_trace_covers_prompt_and_new_tokens(tokenizer):
    model = make_model("qwen2")
    recipe = random_recipe(model)
    prompts = ["the apple is sweet", "a car"]
    out = generate(model, tokenizer, prompts, recipe, 1.0, explain=True, max_new_tokens=5)
    tr = out.trace
    assert tr is not None and tr.sites == ["residual.0", "residual.1", "residual.2"]
    for i, p in enumerate(prompts):
        n_prompt = len(tokenizer(p)["input_ids"])
        assert tr.n_prompt[i] == n_prompt
        v = tr.values[i]
        assert v.shape == (len(tr.tokens[i]), 3)
        known = v[~torch.isnan(torch.tensor(v)).any(1).numpy()]
        assert ((known >= 0) & (known <= 1)).all()
        assert len(known) >= n_prompt  # every prompt token has a gate value
    html = tr.to_html()
    assert html.startswith("<!doctype html>") and "residual.1" in html and "<script" not in html
    assert str(tr.to_rich(0))


def test_trace_values_equal_gate_of_the_unsteered_activation_on_the_prompt(tokenizer):
    model = make_model("llama")
    recipe = random_recipe(model)
    prompt = "the apple is sweet and ripe"
    out = generate(model, tokenizer, [prompt], recipe, 0.0, explain=True, max_new_tokens=2)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    from steerwise.gates import StepContext

    e = recipe.entries[1]
    expected = e.gate(hs[2][0], StepContext()).numpy()  # layer 1 output = hidden_states[2]
    n = ids.shape[1]
    torch.testing.assert_close(torch.tensor(out.trace.values[0][:n, 1]).float(), torch.tensor(expected),
                               rtol=1e-4, atol=1e-5)


def test_unsteered_generation_and_equivalence_at_strength_zero(tokenizer):
    model = make_model("gpt2")
    recipe = random_recipe(model)
    base = generate(model, tokenizer, ["the dog"], None, max_new_tokens=6)
    zero = generate(model, tokenizer, ["the dog"], recipe, 0.0, max_new_tokens=6)
    assert base.continuations == zero.continuations


def test_overlong_prompt_is_refused(tokenizer):
    model = make_model("gpt2")  # 128 positions
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 128"):
        generate(model, tokenizer, ["apple " * 120], None, max_new_tokens=20)


def test_explain_needs_a_recipe(tokenizer):
    with pytest.raises(ValueError, match="needs a recipe"):
        generate(make_model("gpt2"), tokenizer, ["a"], None, explain=True)


@pytest.mark.parametrize("prompts", [[""], ["ok", "   "], [None]])
def test_empty_prompts_are_refused_by_name(prompts, tokenizer):
    from steerwise.generate import generate

    model = make_model("llama")
    with pytest.raises(ValueError, match="prompt #.* is empty"):
        generate(model, tokenizer, prompts, None)
