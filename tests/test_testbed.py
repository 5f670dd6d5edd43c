"""The engine on the testbed LM (../shared/testbed/tox-qwen2-7m): real toxic vs non-toxic text."""

import json
import random
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT.parent / "shared" / "testbed" / "tox-qwen2-7m"
DATA = ROOT.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(
    not (TESTBED / "config.json").is_file() or not DATA.is_dir(),
    reason="../shared/testbed and ../shared/data are absent (they exist on dev machines and CI only)",
)


@pytest.fixture(scope="module")
def setup():
    from steerwise.fit import fit
    from steerwise.models import load_model

    model, tok = load_model(str(TESTBED), device="cpu")
    rows = [json.loads(x) for x in (DATA / "davidson_tweets.jsonl").open()]
    rows = [r for r in rows if 6 <= len(r["text"].split()) <= 30]
    rnd = random.Random(0)
    toxic = rnd.sample([r["text"] for r in rows if r["label"] == "offensive"], 32)
    neutral = rnd.sample([r["text"] for r in rows if r["label"] == "neither"], 32)
    recipe = fit(model, tok, toxic, neutral, method="caa", gate="dsas", progress=False)
    return model, tok, recipe


def test_gates_separate_toxic_from_neutral_tweets(setup):
    _, _, recipe = setup
    accs = [e.diagnostics["gate_accuracy"] for e in recipe.entries]
    assert len(accs) == 6 and max(accs) >= 0.75
    assert any(e.scale == 1.0 for e in recipe.entries)


def test_steering_changes_toxic_continuations_and_round_trips(setup, tmp_path):
    from steerwise.generate import generate
    from steerwise.recipe import Recipe

    model, tok, recipe = setup
    prompts = ["you are a stupid", "I hate those"]
    base = generate(model, tok, prompts, None, max_new_tokens=12)
    zero = generate(model, tok, prompts, recipe, 0.0, max_new_tokens=12)
    steered = generate(model, tok, prompts, recipe, 1.0, max_new_tokens=12, explain=True)
    assert zero.continuations == base.continuations
    assert steered.continuations != base.continuations
    recipe.save_pretrained(tmp_path / "r")
    again = generate(model, tok, prompts, Recipe.from_pretrained(tmp_path / "r"), 1.0,
                     max_new_tokens=12)
    assert again.continuations == steered.continuations
    # the gate is higher, on average, on the toxic prompt's tokens than on a neutral one
    neutral = generate(model, tok, ["the weather today is nice and"], recipe, 1.0,
                       max_new_tokens=2, explain=True)
    toxic_gate = float(torch.tensor(steered.trace.mean_per_token(0)[:4]).nanmean())
    neutral_gate = float(torch.tensor(neutral.trace.mean_per_token(0)[:6]).nanmean())
    assert toxic_gate > neutral_gate
