"""The command line and text loading, end to end on a tiny model saved to disk."""

import json

import pytest
from conftest import make_model, make_tokenizer

from steerwise.cli import main
from steerwise.data import load_texts
from steerwise.recipe import Recipe

FRUIT = ["the apple is sweet and ripe", "a pear is a sweet fruit", "the banana is ripe and sweet",
         "sweet apple and ripe pear", "a ripe banana is a fruit", "the pear was sweet and good"]
OTHER = ["the car is fast on the road", "a dog runs in the rain", "the rain is cold and bad",
         "the train was fast and big", "a cat sleeps in the sun", "a band song is good music"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    make_model("qwen2").save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def test_load_texts_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert load_texts(tmp_path / "a.txt") == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y", "label": 1}\n')
    assert load_texts(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"body": "y"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: no string field 'text'"):
        load_texts(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"text": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:1: not valid JSON"):
        load_texts(tmp_path / "d.jsonl")
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no texts"):
        load_texts(tmp_path / "e.txt")


def test_fit_then_generate_from_the_command_line(model_dir, tmp_path, capsys):
    (tmp_path / "s.txt").write_text("\n".join(FRUIT))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in OTHER))
    out = tmp_path / "recipe"
    rc = main(["fit", "--model", str(model_dir), "--source", str(tmp_path / "s.txt"),
               "--control", str(tmp_path / "c.jsonl"), "--cv-folds", "3", "--whiten",
               "--layers", "0-1", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "gate accuracy" in text and "residual.1" in text
    recipe = Recipe.from_pretrained(out)
    assert [e.site.layer for e in recipe.entries] == [0, 1]
    # --strength auto (the default) held a quarter of the control texts out of the fit
    assert recipe.fit_info["n_source"] == 6 and recipe.fit_info["n_control"] == 4
    assert recipe.fit_info["strength"]["strength"] == recipe.default_strength
    html = tmp_path / "g.html"
    rc = main(["generate", "--model", str(model_dir), "--recipe", str(out), "--strength", "2",
               "--explain", "--compare", "--html", str(html), "--max-new-tokens", "4",
               "the apple is", "a car"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "unsteered:" in text and "steered:" in text
    assert html.read_text().startswith("<!doctype html>")


def test_fit_gate_design_flags(model_dir, tmp_path):
    (tmp_path / "s.txt").write_text("\n".join(FRUIT))
    (tmp_path / "t.txt").write_text("\n".join(f"{t} too" for t in FRUIT))
    (tmp_path / "c.txt").write_text("\n".join(OTHER))
    out = tmp_path / "recipe"
    rc = main(["fit", "--model", str(model_dir), "--source", str(tmp_path / "s.txt"),
               "--target", str(tmp_path / "t.txt"), "--control", str(tmp_path / "c.txt"),
               "--cv-folds", "3", "--whiten", "--layers", "1", "--threshold", "0",
               "--gate-train-on", "tokens", "--gate-negatives", "control+target",
               "--gate-calibrate", "0.8", "--first-token", "skip", "--out", str(out)])
    assert rc == 0
    recipe = Recipe.from_pretrained(out)
    assert recipe.first_token == "skip"  # the position policy (tests/test_compile.py)
    dsas = recipe.fit_info["options"]["dsas"]
    assert (dsas["train_on"], dsas["negatives"], dsas["calibrate"]) == (
        "tokens", "control+target", 0.8)
    assert "negatives_below_eps" in recipe.entries[0].diagnostics  # values: test_gate_variants
    rc = main(["fit", "--model", str(model_dir), "--source", str(tmp_path / "s.txt"),
               "--control", str(tmp_path / "c.txt"), "--cv-folds", "3", "--layers", "1",
               "--strength", "1", "--gate-calibrate", "off", "--out", str(tmp_path / "paper")])
    paper = Recipe.from_pretrained(tmp_path / "paper")
    assert rc == 0 and paper.fit_info["options"]["dsas"]["calibrate"] is None
    assert "negatives_below_eps" not in paper.entries[0].diagnostics


def test_cli_errors_are_one_clear_line(model_dir, tmp_path, capsys):
    (tmp_path / "s.txt").write_text("\n".join(FRUIT[:2]))
    rc = main(["fit", "--model", str(model_dir), "--source", str(tmp_path / "s.txt"),
               "--control", str(tmp_path / "s.txt"), "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("steerwise fit: error:") and "too little data" in err
    assert not (tmp_path / "r").exists()
    rc = main(["generate", "--model", str(model_dir), "--recipe", str(tmp_path / "nope"), "x"])
    assert rc == 2 and "not a steerwise recipe" in capsys.readouterr().err


def test_sites_command(model_dir, capsys):
    assert main(["sites", "--model", str(model_dir)]) == 0
    assert "model.layers.0.self_attn.o_proj (input)" in capsys.readouterr().out


def test_diffusion_fit_and_generate_show_progress(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from steerwise.diffusion.prompts import preset

    sets = preset("banana-blurry")
    for name in ("source", "control", "target"):
        (tmp_path / f"{name}.txt").write_text("\n".join(sets[name][:6]))
    rc = main(["diffusion", "fit", "--pipeline", "tiny-sd", "--source", str(tmp_path / "source.txt"),
               "--control", str(tmp_path / "control.txt"), "--target", str(tmp_path / "target.txt"),
               "--steps", "2", "--height", "32", "--width", "32", "--batch-size", "4",
               "--cv-folds", "3", "--threshold", "0", "--layers", "0", "--out", str(tmp_path / "r")])
    assert rc == 0
    err = capsys.readouterr().err
    # 3 sets x 2 batches (6 prompts, 4 per batch) x 2 steps = 12 denoiser calls
    assert "collecting activations" in err  # the bar itself (its last redraw depends on timing)
    rc = main(["diffusion", "generate", "--pipeline", "tiny-sd", "--recipe", str(tmp_path / "r"),
               "--steps", "2", "--height", "32", "--width", "32", "--out", str(tmp_path / "img"),
               "a banana"])
    assert rc == 0
    assert "denoising" in capsys.readouterr().err and (tmp_path / "img" / "steered-0.png").is_file()
