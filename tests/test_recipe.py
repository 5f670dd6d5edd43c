"""Recipes: save → load → identical outputs; mismatches fail clearly; nothing is pickled."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_model, random_recipe

from steerwise.recipe import CONFIG_NAME, TENSORS_NAME, Recipe, RecipeError, RecipeMismatchError

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
        ({"family": "llama"}, "model type 'llama'"),
        ({"family": "qwen2", "hidden": 64}, "hidden size 64"),
        ({"family": "qwen2", "layers": 2}, "2 layers"),
    ],
)
def test_mismatched_model_fails_with_a_message_naming_it(other, message):
    from conftest import FAMILIES
    from transformers import AutoConfig, AutoModelForCausalLM

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
    import steerwise.recipe_io as rmod  # the file I/O moved out of steerwise.recipe

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


# ---- saving over an existing recipe: all or nothing --------------------------------------------
def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _fail_on_calls(monkeypatch, failing):
    """Make os.rename / os.replace raise on the given (1-based) calls, counted together."""
    calls = []
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def fake(*args, _real=real, **kwargs):
            calls.append(args)
            if len(calls) in failing:
                raise OSError(f"rename number {len(calls)} failed")
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, fake)
    return calls


@pytest.mark.parametrize("failing", [{1}, {2}], ids=["first rename", "second rename"])
def test_failed_overwrite_leaves_the_old_recipe_intact(tmp_path, monkeypatch, failing):
    model = make_model("qwen2")
    old, new = random_recipe(model, seed=1), random_recipe(model, seed=2, scale=0.5)
    old.save_pretrained(tmp_path / "r")
    before = _files(tmp_path / "r")
    _fail_on_calls(monkeypatch, failing)
    with pytest.raises(OSError, match="rename number"):
        new.save_pretrained(tmp_path / "r")
    monkeypatch.undo()
    assert _files(tmp_path / "r") == before
    assert torch.equal(run(model, Recipe.from_pretrained(tmp_path / "r")), run(model, old))
    assert [p.name for p in tmp_path.iterdir()] == ["r"]  # no staging directory left behind


def test_overwrite_whose_restore_fails_says_where_the_old_recipe_is(tmp_path, monkeypatch):
    model = make_model("qwen2")
    random_recipe(model, seed=1).save_pretrained(tmp_path / "r")
    before = _files(tmp_path / "r")
    _fail_on_calls(monkeypatch, {2, 3})
    with pytest.raises(RecipeError, match="the previous recipe could not be put back") as info:
        random_recipe(model, seed=2).save_pretrained(tmp_path / "r")
    kept = Path(str(info.value).rsplit("it is in ", 1)[1])
    assert _files(kept) == before


def test_overwrite_replaces_both_files_and_leaves_no_staging_directory(tmp_path):
    model = make_model("qwen2")
    random_recipe(model, seed=1).save_pretrained(tmp_path / "r")
    new = random_recipe(model, seed=2)
    new.save_pretrained(tmp_path / "r")
    assert torch.equal(run(model, Recipe.from_pretrained(tmp_path / "r")), run(model, new))
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    os.mkdir(tmp_path / "plain")  # a saved recipe gets the permissions of an ordinary directory
    assert (tmp_path / "r").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_saving_refuses_to_replace_what_is_not_a_recipe(tmp_path):
    recipe = random_recipe(make_model("qwen2"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(RecipeError, match=r"mine is a directory that holds other files than a "
                                          r"recipe \(notes.txt\); refusing to replace it"):
        recipe.save_pretrained(tmp_path / "mine")
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(RecipeError, match="file exists and is not a directory; refusing"):
        recipe.save_pretrained(tmp_path / "file")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    (tmp_path / "empty").mkdir()
    recipe.save_pretrained(tmp_path / "empty")  # an empty directory is fine
    names = sorted(p.name for p in (tmp_path / "empty").iterdir())
    assert names == ["README.md", TENSORS_NAME, CONFIG_NAME]  # README.md: the model card


def test_saving_through_a_symlinked_directory_keeps_the_link(tmp_path):
    model = make_model("qwen2")
    random_recipe(model, seed=1).save_pretrained(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    new = random_recipe(model, seed=2)
    new.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert torch.equal(run(model, Recipe.from_pretrained(tmp_path / "real")), run(model, new))


def test_saving_refuses_values_it_could_not_load_back(tmp_path):
    recipe = random_recipe(make_model("qwen2"))
    recipe.entries[1].scale = float("nan")
    with pytest.raises(RecipeError, match=r"entries\[1\]\.scale is nan; recipe values must be"):
        recipe.save_pretrained(tmp_path / "r")
    recipe.entries[1].scale = 1.0
    with torch.no_grad():
        recipe.entries[0].map.vector[0] = float("inf")
    with pytest.raises(RecipeError, match=r"tensor 'entries\.0\.map\.vector' holds inf"):
        recipe.save_pretrained(tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_scaling_recipes_are_saved_all_or_nothing_too(tmp_path, monkeypatch):
    from steerwise.recipe import ModelIdentity
    from steerwise.scaling.interventions import make_intervention
    from steerwise.scaling.recipe import ScaleRecipe
    from steerwise.sites import resolve_sites

    model = make_model("qwen2")
    iv = make_intervention("dynscalar", resolve_sites(model, "mlp"), 32)
    recipe = ScaleRecipe(ModelIdentity.of(model), iv)
    recipe.save_pretrained(tmp_path / "r")
    before = _files(tmp_path / "r")
    with torch.no_grad():
        iv.weight.fill_(0.5)
    recipe.info["trained"] = True
    _fail_on_calls(monkeypatch, {2})
    with pytest.raises(OSError, match="rename number 2"):
        recipe.save_pretrained(tmp_path / "r")
    monkeypatch.undo()
    assert _files(tmp_path / "r") == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"]
    assert ScaleRecipe.from_pretrained(tmp_path / "r").intervention.weight.abs().sum() == 0


def test_saving_into_an_empty_directory_keeps_it_and_fails_cleanly(tmp_path, monkeypatch):
    recipe = random_recipe(make_model("qwen2"))
    out = tmp_path / "out"
    out.mkdir(mode=0o750)
    inode = out.stat().st_ino
    _fail_on_calls(monkeypatch, {2})  # the tensors are moved in, the JSON is not
    with pytest.raises(OSError, match="rename number 2"):
        recipe.save_pretrained(out)
    monkeypatch.undo()
    assert list(out.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]
    recipe.save_pretrained(out)
    assert out.stat().st_ino == inode and out.stat().st_mode & 0o777 == 0o750
    assert Recipe.from_pretrained(out).entries[0].map.vector.equal(recipe.entries[0].map.vector)
