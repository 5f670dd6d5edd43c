"""``steerwise scale fit | eval | plot`` end to end, on a tiny local model and a JSONL task."""

from __future__ import annotations

import json

import pytest

from conftest import make_model, make_tokenizer
from steerwise.cli import main
from steerwise.scaling import ScaleRecipe
from steerwise.tasks.base import TaskExample, save_task_jsonl

EXAMPLES = [
    TaskExample("the dog runs in the rain and", "cat", "bird"),
    TaskExample("a car is fast on the road and", "bus", "train"),
    TaskExample("the sun is warm and the sky", "red", "green"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-cli")
    model_dir = root / "model"
    make_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    task = root / "task.jsonl"
    save_task_jsonl(EXAMPLES, task)
    return root, model_dir, task


@pytest.mark.parametrize("method", ["activscalar", "dynscalar"])
def test_scale_fit_eval_plot(setup, method, capsys):
    root, model_dir, task = setup
    out = root / method
    rc = main(["scale", "fit", "--task", str(task), "--model", str(model_dir), "--method", method,
               "--steps", "5", "--sites", "attn,mlp,residual", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    recipe = ScaleRecipe.from_pretrained(out)
    assert recipe.method == method and recipe.info["task"] == str(task)
    assert len(recipe.sites) == 3 * 3
    assert "train_metrics" in recipe.info
    assert "flip accuracy" in capsys.readouterr().out

    metrics = root / f"{method}.json"
    rc = main(["scale", "eval", "--task", str(task), "--recipe", str(out), "--json", str(metrics),
               "--device", "cpu"])  # the model comes from the recipe
    assert rc == 0
    report = json.loads(metrics.read_text())["0"]
    assert set(report["per_beta"]) == {"+1", "-1"} and report["n"] == 3

    png = root / f"{method}.png"
    rc = main(["scale", "plot", "--recipe", str(out), "--out", str(png), "--device", "cpu"])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scale_cli_errors_are_reported(setup, capsys):
    root, model_dir, _ = setup
    rc = main(["scale", "fit", "--task", str(root / "missing.jsonl"), "--model", str(model_dir),
               "--out", str(root / "x")])
    assert rc == 2
    assert "neither a named task" in capsys.readouterr().err
    rc = main(["scale", "eval", "--task", "ccc", "--recipe", str(root / "nothing")])
    assert rc == 2
