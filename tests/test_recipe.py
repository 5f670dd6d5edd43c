"""Recipes: save → load → identical outputs; mismatches fail clearly; nothing is pickled."""

import json

import pytest
import torch

from conftest import make_model, random_recipe
from steerwise.recipe import CONFIG_NAME, TENSORS_NAME, Recipe, RecipeMismatchError

IDS = torch.tensor([[5, 9, 12, 7, 20]])


def run(model, recipe, strength=1.5):
    with recipe.apply(model, strength), torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("site", ["residual", "heads"])
def test_save_load_gives_identical_outputs(tmp_path, site):
    model = make_model("qwen2")
    recipe = random_recipe(model, site=site)
    recipe.entries[1].scale = 0.5
    recipe.save_pretrained(tmp_path / "r")
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["README.md", TENSORS_NAME, CONFIG_NAME]  # README.md: the model card
    loaded = Recipe.from_pretrained(tmp_path / "r")
    assert torch.equal(run(model, recipe), run(model, loaded))
    cfg = json.loads((tmp_path / "r" / CONFIG_NAME).read_text())
    assert cfg["model"]["model_type"] == "qwen2" and cfg["model"]["num_layers"] == 3
    assert cfg["entries"][1]["scale"] == 0.5


def test_recipe_files_are_safetensors_and_json_only(tmp_path):
    model = make_model("llama")
    random_recipe(model).save_pretrained(tmp_path)
    raw = (tmp_path / TENSORS_NAME).read_bytes()
    assert not raw.startswith(b"\x80")  # not a pickle stream
    header_len = int.from_bytes(raw[:8], "little")
    json.loads(raw[8:8 + header_len])  # safetensors header is JSON


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(family="llama"), "model type 'llama'"),
        (dict(family="qwen2", hidden=64), "hidden size 64"),
        (dict(family="qwen2", layers=2), "2 layers"),
    ],
)
def test_mismatched_model_fails_with_a_message_naming_it(other, message):
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import FAMILIES

    recipe = random_recipe(make_model("qwen2"))
    kw = dict(FAMILIES[other["family"]], vocab_size=64)
    if "hidden" in other:
        kw.update(hidden_size=other["hidden"])
    if "layers" in other:
        kw.update(num_hidden_layers=other["layers"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(other["family"], **kw))
    with pytest.raises(RecipeMismatchError, match=message):
        recipe.apply(model, 1.0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_loading_bad_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a steerwise recipe"):
        Recipe.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a steerwise recipe"):
        Recipe.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format": "steerwise-recipe", "format_version": 99}))
    with pytest.raises(ValueError, match="upgrade steerwise"):
        Recipe.from_pretrained(tmp_path)


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = make_model("qwen2")
    recipe = random_recipe(model)
    import steerwise.recipe as rmod

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rmod, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        recipe.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_recipe_tensors_follow_the_model_dtype_and_device():
    model = make_model("llama", dtype=torch.bfloat16)
    recipe = random_recipe(model)
    with recipe.apply(model, 1.0), torch.no_grad():
        out = model(IDS).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert recipe.entries[0].map.vector.device == next(model.parameters()).device
