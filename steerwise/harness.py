"""lm-evaluation-harness integration: a ``steerwise`` model type for any recipe and any gate.

``SteerwiseLM`` is lm-eval's Hugging Face model (``HFLM``) with every forward pass and every
``generate`` call run inside ``recipe.apply(model, strength)``; registering it (importing this
module) makes it lm-eval's ``--model steerwise``. lm-eval finds models only in its own registry
(there is no plugin entry point), so the command line goes through steerwise, which imports the
registration and then runs lm-eval's own CLI::

    steerwise harness --model M --recipe DIR_OR_HUB_ID --strength 4 -- --tasks hellaswag ...
    python -m steerwise.harness --model steerwise \\
        --model_args pretrained=M,recipe=DIR,strength=4 --tasks hellaswag ...

From Python: ``evaluate(model, tokenizer, recipe, strength, tasks=[...])`` or
``SteerwiseLM(pretrained=model, tokenizer=tok, recipe=recipe, strength=4)`` with
``lm_eval.simple_evaluate``. Install with ``pip install "steerwise[harness]"``.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

try:
    import lm_eval
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the lm-evaluation-harness integration needs lm-eval: pip install 'steerwise[harness]' "
        f"(import failed: {exc})"
    ) from exc

from .models import require_gguf, resolve_gguf, resolve_model_path
from .recipe import Recipe

MODEL_NAME = "steerwise"


@register_model(MODEL_NAME)
class SteerwiseLM(HFLM):
    """lm-eval's ``HFLM``, steered by a steerwise recipe.

    ``pretrained``: a model (instance), hub id, local directory, embedded model name or
    ``.gguf`` file (or a directory plus ``gguf_file``);
    ``recipe``: a ``Recipe``, a recipe directory or a Hub repo id (``recipe_revision`` pins
    it); ``strength``: λ (default: the recipe's). Without a recipe the model is unsteered, as
    lm-eval's ``hf``. Every other keyword goes to ``HFLM`` (``batch_size``, ``dtype``,
    ``device``, ``max_length``...).
    """

    def __init__(
        self,
        pretrained: Any,
        recipe: Recipe | str | Path | None = None,
        strength: float | str | None = None,
        recipe_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        if recipe is not None and not isinstance(recipe, Recipe):  # fail before loading a model
            recipe = Recipe.from_pretrained(recipe, revision=recipe_revision)
        if isinstance(pretrained, str):
            gguf = resolve_gguf(pretrained, kwargs.get("gguf_file"))
            if gguf is not None:  # HFLM passes gguf_file on to transformers
                require_gguf()
                pretrained, kwargs["gguf_file"] = gguf
            else:
                pretrained = resolve_model_path(pretrained)
        super().__init__(pretrained=pretrained, **kwargs)
        self.recipe: Recipe | None = recipe
        if strength is None:
            strength = recipe.default_strength if recipe is not None else 0.0
        self.strength = float(strength)
        if recipe is not None:
            recipe.check_model(self.model)

    def _steered(self):
        if self.recipe is None:
            return nullcontext()
        return self.recipe.apply(self.model, self.strength)

    def _model_call(self, *args: Any, **kwargs: Any):
        with self._steered():
            return super()._model_call(*args, **kwargs)

    def _model_generate(self, *args: Any, **kwargs: Any):
        with self._steered():
            return super()._model_generate(*args, **kwargs)


def evaluate(
    model: Any,
    tokenizer: Any,
    recipe: Recipe | str | Path | None,
    strength: float | None,
    tasks: Sequence[str | dict[str, Any]],
    *,
    include_path: str | Path | None = None,
    include_defaults: bool | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    **simple_evaluate_kwargs: Any,
) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on a model (instance) steered by ``recipe`` at ``strength``.
    ``tasks``: task names or task configs (dicts); ``include_path``: a directory of task YAML
    files; ``include_defaults``: index lm-eval's own tasks too (default: unless every task is a
    dict; indexing them takes half a minute). Returns lm-eval's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = SteerwiseLM(pretrained=model, tokenizer=tokenizer, recipe=recipe, strength=strength,
                     batch_size=batch_size, max_length=max_length)
    if include_defaults is None:
        include_defaults = not all(isinstance(t, dict) for t in tasks)
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_defaults)
    simple_evaluate_kwargs.setdefault("log_samples", False)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                           **simple_evaluate_kwargs)


def lm_eval_main(argv: Sequence[str]) -> None:
    """lm-eval's command line (``lm-eval ARGS``) with the ``steerwise`` model type registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


# ---- MMLU over local CSV files, as lm-eval's own `mmlu` task -----------------------------------
def _mmlu_template() -> dict[str, Any]:
    """lm-eval's MMLU task template (prompt, choices, few-shot sampler, metric), as installed."""
    import yaml

    path = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / "_default_template_yaml"
    if not path.is_file():
        raise FileNotFoundError(f"lm-eval's MMLU template is missing: {path}")
    return yaml.safe_load(path.read_text())


def mmlu_tasks(
    questions: dict[str, list[Any]],
    shots: dict[str, list[Any]] | None,
    directory: str | Path,
) -> list[dict[str, Any]]:
    """One lm-eval task config per subject, in lm-eval's ``mmlu_<subject>`` format, over JSONL
    files written to ``directory`` (``questions``/``shots``: ``MMLUQuestion`` lists)."""
    template = _mmlu_template()
    d = Path(directory)
    tasks = []
    for subject, qs in questions.items():
        files = {"test": d / f"{subject}_test.jsonl"}
        _write_mmlu_jsonl(files["test"], qs)
        if shots and shots.get(subject):
            files["dev"] = d / f"{subject}_dev.jsonl"
            _write_mmlu_jsonl(files["dev"], shots[subject])
        cfg = dict(template)
        cfg.update(
            task=f"steerwise_mmlu_{subject}",
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {k: str(v) for k, v in files.items()},
                            "cache_dir": str(d / "datasets-cache")},
            description="The following are multiple choice questions (with answers) about "
                        f"{subject.replace('_', ' ')}.\n\n",
        )
        if "dev" not in files:
            cfg.pop("fewshot_split", None)
        tasks.append(cfg)
    return tasks


def _write_mmlu_jsonl(path: Path, questions: Sequence[Any]) -> None:
    import json

    with path.open("w", encoding="utf-8") as fh:
        for q in questions:
            fh.write(json.dumps({"question": q.question, "subject": q.subject,
                                 "choices": list(q.choices), "answer": q.answer}) + "\n")


def mmlu_accuracy(
    model: Any,
    tokenizer: Any,
    recipe: Recipe | None,
    strength: float | None,
    questions: dict[str, list[Any]],
    shots: dict[str, list[Any]] | None,
    *,
    k: int = 5,
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[float, int, dict[str, float]]:
    """MMLU k-shot accuracy measured by lm-eval (its MMLU prompt and scoring) on the given
    questions: (accuracy over all questions, number of questions, accuracy per subject)."""
    if k > 0 and not shots:
        raise ValueError(f"{k}-shot MMLU needs dev questions (shots)")
    for subject, qs in (shots or {}).items():
        if subject in questions and len(qs) < k:
            raise ValueError(f"subject {subject!r} has only {len(qs)} dev examples for {k} shots")
    with tempfile.TemporaryDirectory(prefix="steerwise-mmlu-") as tmp:
        tasks = mmlu_tasks(questions, shots if k > 0 else None, tmp)
        # seeds None: leave the caller's random state alone (first_n shots need none)
        res = evaluate(model, tokenizer, recipe, strength, tasks, num_fewshot=k,
                       batch_size=batch_size, max_length=max_length, random_seed=None,
                       numpy_random_seed=None, torch_random_seed=None)
    per_subject, correct, total = {}, 0.0, 0
    for subject, qs in questions.items():
        acc = float(res["results"][f"steerwise_mmlu_{subject}"]["acc,none"])
        per_subject[subject] = acc
        correct += acc * len(qs)
        total += len(qs)
    return correct / max(total, 1), total, per_subject


if __name__ == "__main__":
    lm_eval_main(sys.argv[1:])
