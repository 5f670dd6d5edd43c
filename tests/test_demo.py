"""The offline demo reproduces the DSAS Figure-1 effect on the embedded concept-lm."""

from steerwise.cli import main
from steerwise.demo import mentions, run_demo


def test_mentions_matches_the_word_only():
    assert mentions("the Pear was ripe") and mentions("two pears.")
    assert not mentions("the spear and appear")


def test_dsas_keeps_the_induced_word_to_fruit_contexts():
    result = run_demo(strengths=(7.0,), n_prompts=5, seeds=(0,), show=False)
    caa, dsas = result.rates[("CAA", 7.0)], result.rates[("CAA + DSAS", 7.0)]
    base = result.rates[("unsteered", 0.0)]
    assert min(result.gate_accuracy) >= 0.9
    assert base["other prompts"] < 0.1
    assert caa["fruit prompts"] >= 0.8 and dsas["fruit prompts"] >= 0.8  # both induce it here
    assert caa["other prompts"] >= 0.8  # vanilla CAA: everywhere
    assert dsas["other prompts"] <= 0.4  # DSAS: mostly not outside fruit contexts


def test_demo_command_runs_and_writes_the_heat_map(tmp_path, capsys):
    html = tmp_path / "gates.html"
    rc = main(["demo", "--strengths", "5", "--n-prompts", "2", "--seeds", "1", "--html", str(html)])
    assert rc == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "CAA + DSAS" in out and "share of sampled continuations" in out
    assert html.read_text().startswith("<!doctype html>")
    # the measuring phase shows progress: 1 + 2 steerings x 1 strength, 12 prompts, 1 seed
    assert "measuring" in captured.err and "/36" in captured.err
    # without a colour terminal the examples' gates are numbers (3 examples)
    assert out.count("gate per token (mean over 4 sites):") == 3
