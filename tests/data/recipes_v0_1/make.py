"""How the recipes in this directory were made (run once, with steerwise at 59ea37a, before the
issue-19 refactor of map/gate options): ``PYTHONPATH=. python tests/data/recipes_v0_1/make.py``.

Two recipes fitted on the tiny random GPT-2 of tests/conftest.py (``make_model("gpt2")``, seed 0)
with the test vocabulary, on layers 1-2 of the residual stream:

* ``caa-dsas``: CAA maps with DSAS gates (whitened, so random tiny activations still separate);
* ``linear-act``: Linear-AcT maps with the source-support mask, ungated.

``expected.safetensors`` holds, for the fixed input ``PROMPT``, the unsteered logits and the
logits under each recipe at strength 1 and 2. tests/test_recipe_compat.py loads the recipes with
today's code and checks they steer to the same logits. Do not regenerate: the point is that the
files were written by the old code.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for conftest's tiny models

from conftest import make_model, make_tokenizer

PROMPT = "the sweet apple and the fast car runs in the rain"
FRUIT = ["apple", "pear", "banana", "fruit", "sweet", "ripe"]
OTHER = ["car", "bus", "train", "road", "fast", "wheel", "dog", "cat", "bird", "rain", "snow"]
STRENGTHS = (1.0, 2.0)
RECIPES = ("caa-dsas", "linear-act")


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(words) for _ in range(rnd.randint(8, 12))) for _ in range(n)]


def logits(model, tok, recipe=None, strength: float = 1.0) -> torch.Tensor:
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        if recipe is None:
            return model(**ids).logits[0].float()
        with recipe.apply(model, strength):
            return model(**ids).logits[0].float()


def main() -> None:
    from steerwise.fit import fit
    from steerwise.gates import DSASOptions

    tok, model = make_tokenizer(), make_model("gpt2")
    src, ctl = sentences(FRUIT, 12, 0), sentences(OTHER, 12, 1)
    recipes = {
        "caa-dsas": fit(model, tok, src, ctl, method="caa", gate="dsas", layers="1-2",
                        dsas=DSASOptions(whiten=True, cv_folds=3, threshold=0.0),
                        progress=False),
        "linear-act": fit(model, tok, src, ctl, method="linear-act", gate="none", layers="1-2",
                          map_options={"support": True}, progress=False),
    }
    expected = {"unsteered": logits(model, tok)}
    for name, recipe in recipes.items():
        recipe.save_pretrained(HERE / name)
        for s in STRENGTHS:
            expected[f"{name}@{s:g}"] = logits(model, tok, recipe, s)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(HERE / "expected.safetensors"),
              metadata={"prompt": PROMPT})


if __name__ == "__main__":
    main()
