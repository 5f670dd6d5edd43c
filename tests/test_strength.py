"""default_strength="auto": the recipe's default strength chosen on held-out text by a stated
rule (steerwise.strength), and the strength relative to the layer's token norms."""

import math
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer
from test_fit import FRUIT, OTHER, sentences

from steerwise.card import fit_table, model_card
from steerwise.cli import main
from steerwise.eval.perplexity import text_perplexity
from steerwise.fit import fit
from steerwise.recipe import Recipe
from steerwise.strength import relative_strength

OLD_RECIPE = Path(__file__).parent / "data" / "recipes_v0_1" / "caa-dsas"


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = make_model("llama")
    return model, tok, sentences(FRUIT, 16, 0), sentences(OTHER, 16, 1)


def test_auto_strength_is_the_largest_within_the_budget(setup, tmp_path):
    model, tok, src, ctl = setup
    held = sentences(OTHER, 8, 5)
    recipe = fit(model, tok, src, ctl, progress=False, gate="none", default_strength="auto",
                 strength_budget=0.01, strength_texts=held)
    info = recipe.fit_info["strength"]
    lam = recipe.default_strength
    assert lam > 0 and not info["capped"] and info["budget"] == 0.01
    assert info["held_out"] == "8 strength_texts" and info["n_texts"] == 8
    assert recipe.fit_info["n_control"] == 16  # explicit strength texts: nothing held out
    base = text_perplexity(model, tok, held).perplexity
    assert info["base_perplexity"] == pytest.approx(base)
    assert info["limit"] == pytest.approx(1.01 * base)
    # the rule, checked from outside: λ within the budget, 2λ over it
    assert text_perplexity(model, tok, held, recipe, lam).perplexity <= info["limit"]
    assert text_perplexity(model, tok, held, recipe, 2 * lam).perplexity > info["limit"]
    # the search: a log-scale bracket then bisection, within its evaluation budget
    probed = [p["strength"] for p in info["probes"]]
    assert probed[0] == 1.0 and len(probed) <= 10
    lo, hi = info["bracket"]
    assert lo <= hi <= 1.1 * lo and lam <= lo
    # saved, loaded, and shown in the model card with every probe
    recipe.save_pretrained(tmp_path / "r")
    loaded = Recipe.from_pretrained(tmp_path / "r")
    assert loaded.default_strength == lam
    card = (tmp_path / "r" / "README.md").read_text()
    assert "## Default strength" in card and "+1.0%" in card
    assert all(f"| {s:.4g} |" in card for s in probed)


def test_auto_strength_holds_out_target_and_control_and_reports_the_cap(setup):
    model, tok, src, ctl = setup
    target = sentences(FRUIT[:3] + OTHER[:3], 12, 2)
    recipe = fit(model, tok, src, ctl, target, progress=False, gate="none",
                 default_strength="auto", strength_max=4.0)
    info = recipe.fit_info["strength"]
    # 25 % of each set held out (round(0.25 n)), the maps fitted on the rest
    assert recipe.fit_info["n_target"] == 9 and recipe.fit_info["n_control"] == 12
    assert info["n_texts"] == 3 + 4 and info["held_out"].startswith("3 target and 4 control")
    # on a random tiny model the steering barely moves perplexity: the cap is reached, said so
    assert info["capped"] and recipe.default_strength == 4.0
    assert [p["strength"] for p in info["probes"]] == [1.0, 4.0]
    # a target that is the control set is split once
    same = fit(model, tok, src, ctl, progress=False, gate="none", default_strength="auto",
               strength_max=1.0, strength_holdout=0.5)
    assert same.fit_info["n_control"] == 8 and same.fit_info["target_is_control"]
    assert same.fit_info["strength"]["n_texts"] == 8


def test_auto_is_the_default_and_a_holdout_that_starves_the_fit_says_so(setup):
    model, tok, src, ctl = setup
    recipe = fit(model, tok, src, ctl, progress=False, gate="none", strength_max=1.0)
    assert recipe.fit_info["options"]["default_strength"] == "auto"
    assert recipe.fit_info["n_control"] == 12 and recipe.fit_info["strength"]["n_texts"] == 4
    with pytest.raises(ValueError, match=r"6 source and 4 control examples.*2 control texts "
                                         r"were held out .*--strength auto, the default"):
        fit(model, tok, src[:6], ctl[:6], progress=False)


def test_a_number_is_kept_and_nothing_is_held_out(setup, tmp_path):
    model, tok, src, ctl = setup
    recipe = fit(model, tok, src, ctl, progress=False, gate="none", default_strength=3.0)
    assert recipe.default_strength == 3.0 and "strength" not in recipe.fit_info
    assert recipe.fit_info["n_control"] == 16
    recipe.save_pretrained(tmp_path / "r")
    assert Recipe.from_pretrained(tmp_path / "r").default_strength == 3.0
    # the relative strength: λ · a_l · ‖δ‖ / median token norm, per site
    for row in recipe.diagnostics():
        assert row["token_norm_median"] > 0
        rel = relative_strength(row, 3.0)
        assert rel == pytest.approx(3.0 * row["scale"] * row["delta_norm"]
                                    / row["token_norm_median"])
        assert f"{rel:.3f}" in fit_table(recipe)
    assert "median ‖x‖" in model_card(recipe)


def test_old_recipes_show_no_relative_strength():
    recipe = Recipe.from_pretrained(OLD_RECIPE)
    assert all(relative_strength(r, recipe.default_strength) is None
               for r in recipe.diagnostics())
    assert fit_table(recipe).splitlines()[2].endswith("| – | – |")


@pytest.mark.parametrize("overrides, message", [
    (dict(strength_budget=0.0), r"strength_budget must be > 0"),
    (dict(strength_budget=-0.1), r"strength_budget must be > 0"),
    (dict(strength_budget=math.nan), r"strength_budget must be a finite number"),
    (dict(strength_holdout=0.0), r"strength_holdout must be a share strictly between 0 and 1"),
    (dict(strength_holdout=1.0), r"strength_holdout must be a share strictly between 0 and 1"),
    (dict(strength_holdout=math.nan), r"strength_holdout must be a finite number"),
    (dict(strength_max=math.inf), r"strength_max must be a finite number"),
    (dict(strength_evals=1), r"strength_evals must be an integer >= 2"),
    (dict(default_strength="strong"), r"default_strength must be a number or 'auto'"),
    (dict(default_strength=math.nan), r"default_strength must be a finite number or 'auto'"),
    (dict(default_strength=2.0, strength_texts=["the car"]),
     r"strength_texts are read only with default_strength='auto'"),
    (dict(default_strength="auto", strength_texts=[]), r"the strength_texts set is empty"),
    (dict(default_strength="auto", strength_holdout=0.9),
     r"holding out 0.9 of the 2 control texts .* leaves none to fit on"),
])
def test_bad_strength_options_are_clear_errors(setup, overrides, message):
    model, tok, _, _ = setup
    with pytest.raises(ValueError, match=message):
        fit(model, tok, ["apple pear", "sweet fruit"], ["the car", "a dog"], progress=False,
            gate="none", **overrides)


def test_cli_strength_auto(tmp_path, capsys):
    model_dir = tmp_path / "model"
    make_model("qwen2").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (tmp_path / "s.txt").write_text("\n".join(sentences(FRUIT, 8, 0)))
    (tmp_path / "c.txt").write_text("\n".join(sentences(OTHER, 8, 1)))
    args = ["fit", "--model", str(model_dir), "--source", str(tmp_path / "s.txt"),
            "--control", str(tmp_path / "c.txt"), "--gate", "none", "--layers", "0-1"]
    out = tmp_path / "recipe"
    rc = main([*args, "--strength", "auto", "--strength-budget", "0.02", "--strength-max", "2",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "default strength λ =" in text and "evaluations" in text
    recipe = Recipe.from_pretrained(out)
    assert recipe.fit_info["strength"]["budget"] == 0.02
    assert recipe.fit_info["options"]["default_strength"] == "auto"
    assert recipe.default_strength == recipe.fit_info["strength"]["strength"]
    for bad, message in ((["--strength-budget", "0"], "expected a number > 0"),
                         (["--strength", "nope"], "expected a finite number or 'auto'")):
        rc = main([*args, "--strength", "auto", *bad, "--out", str(tmp_path / "bad")])
        assert rc == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
