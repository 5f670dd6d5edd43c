"""Malformed recipes: each gives one ``RecipeError`` naming the file and the field, never a
traceback from json/safetensors/torch, and nothing is allocated from a declared size before it
is checked against the safetensors header."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from conftest import make_model, random_recipe
from safetensors.torch import load_file, save_file

from steerwise.hooks import SiteSteering
from steerwise.maps import MeanActMap
from steerwise.recipe import (
    CONFIG_NAME,
    TENSORS_NAME,
    ModelIdentity,
    Recipe,
    RecipeError,
    RecipeNotFoundError,
)
from steerwise.scaling.interventions import make_intervention
from steerwise.scaling.recipe import ScaleRecipe
from steerwise.sites import resolve_sites


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved steering recipe (CAA + DSAS on 3 layers) and a saved scaling recipe (steervec)."""
    root = tmp_path_factory.mktemp("saved")
    model = make_model("qwen2")
    random_recipe(model).save_pretrained(root / "steer")
    sites = resolve_sites(model, "mlp")
    iv = make_intervention("steervec", sites, 32, n_positions=4)
    ScaleRecipe(ModelIdentity.of(model), iv).save_pretrained(root / "scale")
    return root


def copy_of(saved, kind, tmp_path):
    return shutil.copytree(saved / kind, tmp_path / kind)


def edit_json(path, change):
    config = json.loads((path / CONFIG_NAME).read_text())
    change(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(path, change):
    tensors = load_file(str(path / TENSORS_NAME))
    change(tensors)
    save_file(tensors, str(path / TENSORS_NAME))


def load_error(loader, path) -> str:
    with pytest.raises(RecipeError) as info:
        loader.from_pretrained(path)
    return str(info.value)


def set_in(keys, value):
    def change(config):
        target = config
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


# ---- the JSON ----------------------------------------------------------------------------------
JSON_CASES = {
    "scale is a string": (set_in(["entries", 2, "scale"], "abc"),
                          r"entries\[2\]\.scale: expected a number, got \"abc\""),
    "NaN scale": (set_in(["entries", 1, "scale"], float("nan")),
                  r"entries\[1\]\.scale: nan is not a finite number"),
    "infinite default strength": (set_in(["default_strength"], float("inf")),
                                  r"default_strength: inf is not a finite number"),
    "NaN in diagnostics": (set_in(["entries", 0, "diagnostics", "x"], float("-inf")),
                           r"entries\[0\]\.diagnostics\.x: -inf is not a finite number"),
    "unknown top-level key": (set_in(["defualt_strength"], 2.0),
                              (r"the top level: unknown key 'defualt_strength' "
                              r"\(did you mean 'default_strength'\?\)")),
    "unknown entry key": (set_in(["entries", 0, "scal"], 2.0),
                          r"entries\[0\]: unknown key 'scal' \(did you mean 'scale'\?\)"),
    "unknown gate option": (set_in(["entries", 0, "gate", "config", "constnt"], True),
                            r"entries\[0\]\.gate\.config: unknown key 'constnt'"),
    "gate option of the wrong type": (set_in(["entries", 0, "gate", "config", "constant"], "no"),
                                      r"entries\[0\]\.gate\.config\.constant: expected a boolean"),
    "map option of the wrong type": (set_in(["entries", 0, "map"],
                                            {"method": "iti", "config": {"n_heads": "abc"}}),
                                     r"entries\[0\]\.map\.config\.n_heads: expected an integer"),
    "unknown map": (set_in(["entries", 0, "map", "method"], "caaa"),
                    r"entries\[0\]\.map\.method: unknown steering method 'caaa'"),
    "site field of the wrong type": (set_in(["entries", 1, "site", "layer"], "1"),
                                     r"entries\[1\]\.site\.layer: expected an integer"),
    "site without a module": (lambda c: c["entries"][0]["site"].pop("module"),
                              r"entries\[0\]\.site: missing required key 'module'"),
    "entries is an object": (set_in(["entries"], {}), r"entries: expected an array"),
    "an entry is a list": (set_in(["entries", 1], []),
                           r"entries\[1\]: expected a JSON object, got \[\]"),
    "model without a hidden size": (lambda c: c["model"].pop("hidden_size"),
                                    r"model: missing required key 'hidden_size'"),
    "format version is a string": (set_in(["format_version"], "1"),
                                   r"format_version: expected an integer"),
    "dim 3e8 (a float)": (set_in(["entries", 0, "dim"], 3e8),
                          r"entries\[0\]\.dim: expected an integer, got 300000000.0"),
    "dim 3*10^8": (set_in(["entries", 0, "dim"], 300_000_000),
                   r"entries\[0\]\.dim: 300000000 is out of range \(a width is 1\.\.1048576\)"),
    "dim 10^12": (set_in(["entries", 0, "dim"], 10**12), r"entries\[0\]\.dim: 1000000000000 is out"),
    "dim other than the tensors'": (set_in(["entries", 0, "dim"], 1000),
                                    (r"tensor 'entries\.0\.map\.vector' has shape \(32,\), but "
                                    r"entries\[0\]\.map \('caa', dim 1000\) needs \(1000,\)")),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_malformed_json_names_the_file_and_the_field(saved, tmp_path, case):
    change, message = JSON_CASES[case]
    path = copy_of(saved, "steer", tmp_path)
    edit_json(path, change)
    error = load_error(Recipe, path)
    assert error.startswith((str(path / CONFIG_NAME), str(path / TENSORS_NAME)))
    assert re.search(message, error), error


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", r"the top level: expected a JSON object, got \[1, 2\] \(a JSON array\)"),
        ('{"format": "steerwise-recipe",\n "entries": [,]}', r"invalid JSON at line 2, column 14"),
        (b'{"format": "steerwise-recipe",\n "x": "caf\xe9"}', (r"not UTF-8 text \(byte 0xe9 at "
                                                          r"line 2, column 11\)")),
        ("", r"invalid JSON at line 1, column 1"),
        ("[" * 100_000, r"invalid JSON: nested too deeply"),
    ],
    ids=["a list", "a syntax error", "not UTF-8", "empty", "deeply nested"],
)
def test_unreadable_json_names_line_and_column(saved, tmp_path, text, message):
    path = copy_of(saved, "steer", tmp_path)
    raw = text if isinstance(text, bytes) else text.encode()
    (path / CONFIG_NAME).write_bytes(raw)
    error = load_error(Recipe, path)
    assert error.startswith(f"{path / CONFIG_NAME}: ")
    assert re.search(message, error), error


def test_an_oversized_json_is_refused_before_it_is_read(saved, tmp_path, monkeypatch):
    import steerwise.recipe_io as rmod  # the file I/O moved out of steerwise.recipe

    path = copy_of(saved, "steer", tmp_path)
    size = (path / CONFIG_NAME).stat().st_size
    monkeypatch.setattr(rmod, "MAX_CONFIG_BYTES", size - 1)
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("read"))
    assert f"{size} bytes; a recipe's JSON is at most {size - 1}" in load_error(Recipe, path)


def test_missing_directory_and_file_are_not_found_errors(tmp_path):
    with pytest.raises(RecipeNotFoundError, match="no such directory") as info:
        Recipe.from_pretrained(tmp_path / "nope")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


# ---- the tensors -------------------------------------------------------------------------------
def _put(name, value):
    return lambda t: t.__setitem__(name, value)


TENSOR_CASES = {
    "wrong shape": (_put("entries.1.map.vector", torch.zeros(31)),
                    (r"tensor 'entries\.1\.map\.vector' has shape \(31,\), but entries\[1\]\.map "
                    r"\('caa', dim 32\) needs \(32,\)")),
    "missing tensor": (lambda t: t.pop("entries.2.gate.weight"),
                       (r"missing tensor 'entries\.2\.gate\.weight', needed by entries\[2\]\.gate "
                       r"\('dsas', dim 32\)")),
    "extra tensor": (_put("entries.7.map.vector", torch.zeros(32)),
                     (r"unexpected tensor 'entries\.7\.map\.vector': no part of steerwise\.json "
                     r"uses them")),
    "integer tensor": (_put("entries.0.map.vector", torch.zeros(32, dtype=torch.int64)),
                       r"tensor 'entries\.0\.map\.vector' has dtype I64"),
    "NaN in a vector": (lambda t: t["entries.0.map.vector"].__setitem__(3, float("nan")),
                        r"tensor 'entries\.0\.map\.vector' holds NaN \(1 of 32 values\)"),
    "inf in a gate": (lambda t: t["entries.2.gate.bias"].fill_(float("inf")),
                      r"tensor 'entries\.2\.gate\.bias' holds inf \(1 of 1 values\)"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_tensors_that_do_not_match_the_json_are_named(saved, tmp_path, case):
    change, message = TENSOR_CASES[case]
    path = copy_of(saved, "steer", tmp_path)
    edit_tensors(path, change)
    error = load_error(Recipe, path)
    assert error.startswith(f"{path / TENSORS_NAME}: ")
    assert re.search(message, error), error


@pytest.mark.parametrize(
    "cut, message",
    [
        # safetensors 0.4 gives the error's name (MetadataIncompleteBuffer), later ones a sentence.
        (lambda raw: raw[:-10], "incomplete metadata, file not fully covered|MetadataIncomplete"),
        (lambda raw: raw[:5], "header too small|HeaderTooSmall"),
        (lambda raw: b"\x00" * 8 + raw[8:], "[Hh]eader"),
        (lambda raw: b"not a safetensors file at all" * 10, "header too large|HeaderTooLarge"),
    ],
    ids=["truncated", "cut in the header", "zeroed length", "garbage"],
)
def test_unreadable_safetensors_is_a_recipe_error(saved, tmp_path, cut, message):
    path = copy_of(saved, "steer", tmp_path)
    raw = (path / TENSORS_NAME).read_bytes()
    (path / TENSORS_NAME).write_bytes(cut(raw))
    error = load_error(Recipe, path)
    assert error.startswith(f"{path / TENSORS_NAME}: not a readable safetensors file (")
    assert re.search(message, error), error


def test_a_huge_declared_width_is_checked_on_the_header_before_anything_is_allocated(
    saved, tmp_path, monkeypatch
):
    """With the sanity bound lifted, a 10^12-wide entry (4 TB as float32) still fails at once on
    the header's shape: the JSON's sizes only ever build modules on the meta device."""
    import steerwise.recipe_io as rmod  # the file I/O moved out of steerwise.recipe

    monkeypatch.setattr(rmod, "MAX_WIDTH", 10**13)
    path = copy_of(saved, "steer", tmp_path)
    edit_json(path, set_in(["entries", 0, "dim"], 10**12))
    assert "needs (1000000000000,)" in load_error(Recipe, path)
    edit_json(path, set_in(["model", "hidden_size"], 10**12))
    edit_json(path, lambda c: [e.pop("dim") for e in c["entries"]])  # dim defaults to hidden size
    assert "needs (1000000000000,)" in load_error(Recipe, path)


def test_infinite_support_bounds_load_and_other_infinities_do_not(tmp_path):
    """The AcT maps use -inf/+inf as "no bound" in lo/hi: that alone is allowed."""
    model = make_model("qwen2")
    site = resolve_sites(model, "residual")[0]
    recipe = Recipe(ModelIdentity.of(model),
                    [SiteSteering(site, MeanActMap(torch.ones(32), support=True))], "mean-act", "none")
    loaded = Recipe.from_pretrained(recipe.save_pretrained(tmp_path / "r"))
    assert torch.equal(loaded.entries[0].map.lo, torch.full((32,), -torch.inf))
    edit_tensors(tmp_path / "r", lambda t: t["entries.0.map.lo"].__setitem__(0, torch.inf))
    assert "tensor 'entries.0.map.lo' holds inf (1 of 32 values)" in \
        load_error(Recipe, tmp_path / "r")


# ---- symlinks: followed; what they lead to must be a regular file ------------------------------
def test_symlinked_files_are_followed(saved, tmp_path):
    """As in a Hugging Face cache, where a snapshot's files link to blobs."""
    blobs = copy_of(saved, "steer", tmp_path)
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in (CONFIG_NAME, TENSORS_NAME):
        (linked / name).symlink_to(blobs / name)
    (tmp_path / "dirlink").symlink_to(linked, target_is_directory=True)
    a, b = Recipe.from_pretrained(blobs), Recipe.from_pretrained(tmp_path / "dirlink")
    assert torch.equal(a.entries[0].map.vector, b.entries[0].map.vector)


def test_symlinks_to_anything_but_a_regular_file_are_refused(saved, tmp_path):
    path = copy_of(saved, "steer", tmp_path)
    (path / TENSORS_NAME).unlink()
    (path / TENSORS_NAME).symlink_to(tmp_path / "gone")
    assert "steering.safetensors: a broken symlink (to " in load_error(Recipe, path)
    (path / TENSORS_NAME).unlink()
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    (path / TENSORS_NAME).symlink_to(tmp_path / "fifo")
    assert (f"steering.safetensors: not a regular file (a symlink to {tmp_path / 'fifo'}); a "
            f"steerwise recipe's files must be regular files") in load_error(Recipe, path)
    (path / CONFIG_NAME).unlink()
    (path / CONFIG_NAME).symlink_to(tmp_path, target_is_directory=True)
    assert "steerwise.json: a directory (a symlink to" in load_error(Recipe, path)


# ---- scaling recipes: the same rules -----------------------------------------------------------
SCALE_CASES = {
    "wrong width": (lambda p: edit_json(p, set_in(["dim"], 16)),
                    (r"tensor 'vectors' has shape \(3, 4, 32\), but the steervec intervention "
                    r"\(3 sites, dim 16, config \{'n_positions': 4\}\) needs \(3, 4, 16\)")),
    "10^12 positions": (lambda p: edit_json(p, set_in(["config", "n_positions"], 10**12)),
                        r"needs \(3, 1000000000000, 32\)"),
    "positions as a string": (lambda p: edit_json(p, set_in(["config", "n_positions"], "4")),
                              r"config\.n_positions: expected an integer, got \"4\""),
    "no positions": (lambda p: edit_json(p, lambda c: c["config"].pop("n_positions")),
                     r"config: missing required key 'n_positions'"),
    "unknown option": (lambda p: edit_json(p, set_in(["config", "n_position"], 4)),
                       r"config: unknown key 'n_position' \(did you mean 'n_positions'\?\)"),
    "unknown method": (lambda p: edit_json(p, set_in(["method"], "steer")),
                       r"method: unknown method 'steer'; known: activscalar, steervec, dynscalar"),
    "no sites": (lambda p: edit_json(p, set_in(["sites"], [])), r"sites: empty"),
    "huge dim": (lambda p: edit_json(p, set_in(["dim"], 3 * 10**8)),
                 r"dim: 300000000 is out of range"),
    "NaN in info": (lambda p: edit_json(p, set_in(["info", "loss"], float("nan"))),
                    r"info\.loss: nan is not a finite number"),
    "extra tensor": (lambda p: edit_tensors(p, _put("offset", torch.zeros(3))),
                     r"unexpected tensor 'offset'"),
    "missing tensor": (lambda p: edit_tensors(p, lambda t: t.pop("vectors")),
                       r"missing tensor 'vectors', needed by the steervec intervention"),
    "NaN tensor": (lambda p: edit_tensors(p, lambda t: t["vectors"].view(-1).__setitem__(
        0, float("nan"))), r"tensor 'vectors' holds NaN \(1 of 384 values\)"),
    "truncated": (lambda p: (p / TENSORS_NAME).write_bytes((p / TENSORS_NAME).read_bytes()[:-1]),
                  r"not a readable safetensors file"),
}


@pytest.mark.parametrize("case", SCALE_CASES)
def test_malformed_scaling_recipes_name_the_file_and_the_field(saved, tmp_path, case):
    change, message = SCALE_CASES[case]
    path = copy_of(saved, "scale", tmp_path)
    change(path)
    error = load_error(ScaleRecipe, path)
    assert error.startswith(str(path)), error
    assert re.search(message, error), error
