"""steerwise export --format llama.cpp: GGUF control vectors, read back with gguf's reader."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import make_model, random_recipe

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed "
                                          "(pip install steerwise[gguf]); CI's realmodel job runs "
                                          "this module")
GGMLQuantizationType, GGUFReader = gguf.GGMLQuantizationType, gguf.GGUFReader

from steerwise.cli import main
from steerwise.export import (
    ExportError,
    control_vector,
    export_recipe,
    llama_cpp_buffer,
    read_control_vector,
)
from steerwise.fit import fit
from steerwise.hooks import SiteSteering
from steerwise.maps.act import LinearActMap, MeanActMap
from steerwise.recipe import ModelIdentity, Recipe
from steerwise.sites import find_layers, resolve_sites

FRUIT = ["apple", "pear", "banana", "fruit", "sweet", "ripe"]
OTHER = ["car", "bus", "train", "road", "fast", "wheel", "dog", "cat", "bird", "rain", "snow"]


def sentences(words, n, seed):
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(8, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def caa(tokenizer):
    """A CAA recipe without gate on every layer of a 3-layer random Llama."""
    model = make_model("llama")
    recipe = fit(model, tokenizer, sentences(FRUIT, 8, 0), target=sentences(OTHER, 8, 1),
                 method="caa", gate="none", first_token="steer", progress=False)
    recipe.default_strength = 3.0  # steers every position, as llama.cpp does
    return model, recipe


def field_value(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_export_writes_one_f32_direction_per_layer_with_strength_times_scale(caa, tmp_path):
    _, recipe = caa
    recipe.entries[2].scale = 0.5  # a layer scale a_l is multiplied in
    try:
        out = export_recipe(recipe, tmp_path / "v.gguf", strength=2.0, drop_layer_0=True)
    finally:
        recipe.entries[2].scale = 1.0
    reader = GGUFReader(out)
    names = [t.name for t in reader.tensors]
    assert names == ["direction.1", "direction.2"]  # residual.0 cannot be steered by llama.cpp
    for t in reader.tensors:
        assert t.tensor_type == GGMLQuantizationType.F32
        assert [int(n) for n in t.shape] == [32]
    got = read_control_vector(out)
    for layer, scale in ((1, 1.0), (2, 0.5)):
        e = recipe.entries[layer]
        assert e.site.name == f"residual.{layer}"
        want = 2.0 * scale * e.map.vector.numpy()
        np.testing.assert_allclose(got[layer], want, rtol=1e-6, atol=1e-7)
        assert np.abs(want).max() > 0
    assert field_value(reader, "general.architecture") == "controlvector"
    assert field_value(reader, "controlvector.model_hint") == "llama"
    assert field_value(reader, "controlvector.layer_count") == 2
    assert field_value(reader, "steerwise.method") == "caa"
    assert field_value(reader, "steerwise.strength") == pytest.approx(2.0)
    assert field_value(reader, "steerwise.num_layers") == 3


def test_default_strength_is_the_recipes(caa, tmp_path):
    _, recipe = caa
    cv = control_vector(recipe, drop_layer_0=True)
    assert cv.strength == 3.0
    np.testing.assert_allclose(cv.directions[1], 3.0 * recipe.entries[1].map.vector.numpy(),
                               rtol=1e-6)
    assert control_vector(recipe, 0.0, drop_layer_0=True).directions[2].max() == 0.0


def _with_directions(model, directions, ids, shift):
    """Logits with ``directions[N]`` added to the output of decoder layer ``N + shift``."""
    _, layers = find_layers(model)

    def adder(vec):
        def add(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + vec, *output[1:])
            return output + vec
        return add

    handles = [layers[n + shift].register_forward_hook(adder(torch.from_numpy(v)))
               for n, v in directions.items()]
    try:
        return model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def test_layer_numbering_matches_llama_cpp_layer_output(caa, tokenizer, tmp_path):
    """llama.cpp adds direction.N to the output of decoder layer N (0-based) at every position
    (llm_graph_context::build_cvec on l_out). Emulated with a plain forward hook fed from the
    file, it gives the logits of steerwise's own hooks."""
    model, recipe = caa
    strength = 4.0
    out = export_recipe(recipe, tmp_path / "v.gguf", strength=strength, drop_layer_0=True)
    directions = read_control_vector(out)
    part = Recipe(recipe.model, [e for e in recipe.entries if e.site.layer > 0], "caa", "none",
                  strength)
    ids = tokenizer(["apple pear banana sweet", "the car runs fast"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with part.apply(model, strength):
            steered = model(input_ids=ids).logits
        emulated = _with_directions(model, directions, ids, shift=0)
        # the off-by-one reading (direction.N on layer N-1's output) does not match
        shifted = _with_directions(model, directions, ids, shift=-1)
    assert (steered - plain).abs().max() > 1e-3
    torch.testing.assert_close(emulated, steered, rtol=1e-4, atol=1e-5)
    assert (shifted - steered).abs().max() > 1e-3


def test_recipe_directory_and_iti_export(tokenizer, tmp_path):
    model = make_model("qwen2")
    recipe = fit(model, tokenizer, sentences(FRUIT, 8, 0), target=sentences(OTHER, 8, 1),
                 method="iti", gate="none", layers="1-2", first_token="skip", progress=False)
    recipe.save_pretrained(tmp_path / "r")
    # a recipe that leaves the first token unsteered: llama.cpp cannot skip it, export says so
    with pytest.warns(UserWarning, match=r"first_token='skip'.*llama.cpp also steers the first"):
        out = export_recipe(tmp_path / "r", tmp_path / "iti.gguf")
    got = read_control_vector(out)
    assert sorted(got) == [1, 2]
    for e in recipe.entries:
        want = recipe.default_strength * e.scale * e.map.affine().b.numpy()
        np.testing.assert_allclose(got[e.site.layer], want, rtol=1e-5, atol=1e-7)
    assert GGUFReader(out).fields["controlvector.model_hint"].contents() == "qwen2"


def _one_site_recipe(model, steering_map, layer=1):
    site = resolve_sites(model, "residual", [layer])[0]
    return Recipe(ModelIdentity.of(model), [SiteSteering(site, steering_map)],
                  steering_map.method, "none", 1.0)


def test_refusals_say_what_is_lost(tmp_path):
    model = make_model("llama")
    d = 32
    cases = [
        (random_recipe(model, gated=True), "the gate is lost: llama.cpp adds the vector at every token"),
        (random_recipe(model, site="attn", gated=False), "'attn' sites"),
        (random_recipe(model, site="heads", gated=False), "'heads' sites"),
        (_one_site_recipe(model, LinearActMap(torch.full((d,), 0.5), torch.ones(d), support=False)),
         "is affine"),
        (_one_site_recipe(model, MeanActMap(torch.ones(d), -torch.ones(d), torch.ones(d),
                                            support=True)), "source support"),
        (random_recipe(model, gated=False), "never steers layer 0's output"),
    ]
    for recipe, message in cases:
        with pytest.raises(ExportError, match=message.replace("(", r"\(").replace(")", r"\)")):
            export_recipe(recipe, tmp_path / "v.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left behind
    # additive in effect: Mean-AcT without a support, Linear-AcT with ω = 1
    for m in (MeanActMap(torch.ones(d), support=False),
              LinearActMap(torch.ones(d), torch.full((d,), 2.0), support=False)):
        got = read_control_vector(export_recipe(_one_site_recipe(model, m), tmp_path / "ok.gguf"))
        np.testing.assert_allclose(got[1], m.affine().b.numpy())


def test_failed_write_leaves_the_old_file_and_no_temporary(caa, tmp_path, monkeypatch):
    import gguf

    _, recipe = caa
    target = tmp_path / "v.gguf"
    target.write_bytes(b"old")

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_recipe(recipe, target, drop_layer_0=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["v.gguf"]


def test_llama_cpp_buffer_scales_and_sums_files_like_common_control_vector_load(caa, tmp_path):
    _, recipe = caa
    a = export_recipe(recipe, tmp_path / "a.gguf", strength=1.0, drop_layer_0=True)
    b = export_recipe(recipe, tmp_path / "b.gguf", strength=2.0, drop_layer_0=True)
    n_embd, data = llama_cpp_buffer([(a, 0.5), (b, -1.0)], n_layers=3)
    assert n_embd == 32 and data.shape == (2 * 32,)  # layers 1 and 2, layer 1 first
    for layer in (1, 2):
        want = (0.5 - 2.0) * recipe.entries[layer].map.vector.numpy()
        np.testing.assert_allclose(data[(layer - 1) * 32: layer * 32], want, rtol=1e-6, atol=1e-7)


def test_cli_export_and_one_line_errors(caa, tmp_path, capsys):
    model, recipe = caa
    recipe.save_pretrained(tmp_path / "r")
    out = tmp_path / "v.gguf"
    assert main(["export", "--recipe", str(tmp_path / "r"), "--format", "llama.cpp",
                 "--out", str(out), "--strength", "2", "--drop-layer-0"]) == 0
    assert "2 direction tensors" in capsys.readouterr().out
    np.testing.assert_allclose(read_control_vector(out)[2],
                               2.0 * recipe.entries[2].map.vector.numpy(), rtol=1e-6)
    # refused: layer 0 without --drop-layer-0; nothing written
    bad = tmp_path / "bad.gguf"
    assert main(["export", "--recipe", str(tmp_path / "r"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("steerwise export: error: cannot export") and "\n" not in err
    assert "--drop-layer-0" in err and not bad.exists()
    gated = random_recipe(model, gated=True)
    gated.save_pretrained(tmp_path / "g")
    assert main(["export", "--recipe", str(tmp_path / "g"), "--out", str(bad)]) == 2
    assert "the gate is lost" in capsys.readouterr().err and not bad.exists()
    assert main(["export", "--recipe", str(tmp_path / "missing"), "--out", str(bad)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["export", "--recipe", str(tmp_path / "r"), "--out", str(tmp_path / "no" / "v.gguf"),
                 "--drop-layer-0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--recipe", str(tmp_path / "r"), "--out", str(bad),
                 "--strength", "nan"]) == 2
    assert main(["export", "--recipe", str(tmp_path / "r"), "--out", str(bad),
                 "--format", "onnx"]) == 2
    assert not bad.exists()


def test_cli_help_lists_export(capsys):
    assert main(["export", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--control-vector-scaled" in text and "--drop-layer-0" in text
