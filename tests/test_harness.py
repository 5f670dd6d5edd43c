"""lm-evaluation-harness: the ``steerwise`` model type on small local YAML tasks over JSONL files
(loglikelihood and generation), from Python and from the command line. Offline: lm-eval reads the
JSONL files through the ``datasets`` json builder, with its cache in a temporary directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import VOCAB_WORDS, make_model, make_tokenizer, random_recipe

from steerwise.cli import main
from steerwise.eval.mmlu import MMLUQuestion, build_prompt
from steerwise.recipe import RecipeMismatchError

try:
    import lm_eval
except ImportError:
    lm_eval = None
if lm_eval is not None:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from steerwise.harness import SteerwiseLM, mmlu_accuracy
needs_lm_eval = pytest.mark.skipif(
    lm_eval is None, reason="lm-eval is not installed: pip install 'steerwise[harness]'")

MC = [  # multiple choice: one loglikelihood request per choice
    {"question": "the apple is", "choices": ["sweet", "cold", "fast"], "answer": 0},
    {"question": "the car is", "choices": ["fast", "ripe", "warm"], "answer": 0},
    {"question": "the dog", "choices": ["runs", "sleeps", "barked"], "answer": 1},
    {"question": "the rain was", "choices": ["cold", "sweet", "red"], "answer": 0},
]
GEN = [{"prompt": "the apple is", "target": "sweet"}, {"prompt": "a big bus", "target": "fast"},
       {"prompt": "the band", "target": "song"}]
TASKS = ("sw_mc", "sw_gen")


def write_tasks(d: Path) -> Path:
    for name, rows in (("mc", MC), ("gen", GEN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n"
              f"    test: {{path}}\n  cache_dir: {d / 'datasets-cache'}\n")
    (d / "sw_mc.yaml").write_text(
        "task: sw_mc\n" + common.format(path=d / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: "
          "'{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
          "    aggregation: mean\n    higher_is_better: true\n")
    (d / "sw_gen.yaml").write_text(
        "task: sw_gen\n" + common.format(path=d / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
          "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
          "    higher_is_better: true\n")
    return d


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="module")
def manager(tasks_dir):  # only the local tasks: indexing lm-eval's own takes ~30 s
    return TaskManager(include_path=str(tasks_dir), include_defaults=False)


def flatten(task: str, samples: list[dict]) -> list:
    """Every request's raw response in document order: log-likelihoods (sw_mc; the CLI's
    sample files hold them as strings) or generated texts (sw_gen)."""
    out = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        for r in s["resps"]:
            out.append(float(r[0][0]) if task == "sw_mc" else r[0])
    return out


def responses(lm, manager) -> dict[str, list]:
    res = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), log_samples=True, task_manager=manager)
    return {task: flatten(task, res["samples"][task]) for task in TASKS}


@pytest.fixture(scope="module")
def setup():
    model, tok = make_model("llama"), make_tokenizer()
    return model, tok, random_recipe(model)


@needs_lm_eval
def test_steered_differs_strength_zero_matches_and_python_route_agrees(setup, manager):
    model, tok, recipe = setup
    kw = {"tokenizer": tok, "batch_size": 2}
    plain = responses(HFLM(pretrained=model, **kw), manager)
    zero = responses(SteerwiseLM(pretrained=model, recipe=recipe, strength=0.0, **kw), manager)
    steered = responses(SteerwiseLM(pretrained=model, recipe=recipe, strength=4.0, **kw),
                        manager)
    with recipe.apply(model, 4.0):  # the Python route: lm-eval's hf model inside recipe.apply
        python_route = responses(HFLM(pretrained=model, **kw), manager)
    assert zero == plain
    assert steered == python_route
    assert all(isinstance(x, float) for x in steered["sw_mc"]) and len(steered["sw_mc"]) == 12
    assert all(a != b for a, b in zip(steered["sw_mc"], plain["sw_mc"]))  # loglikelihoods
    assert steered["sw_gen"] != plain["sw_gen"]  # generations
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@needs_lm_eval
def test_recipe_from_directory_and_mismatch(setup, tmp_path):
    model, tok, recipe = setup
    recipe.save_pretrained(tmp_path / "r")
    lm = SteerwiseLM(pretrained=model, tokenizer=tok, recipe=str(tmp_path / "r"))
    assert lm.strength == recipe.default_strength and lm.recipe.method == "caa"
    with pytest.raises(RecipeMismatchError, match="fitted for another model"):
        SteerwiseLM(pretrained=make_model("qwen2"), tokenizer=tok, recipe=recipe)


@needs_lm_eval
def test_cli_equals_python_route(tasks_dir, manager, tmp_path):
    from steerwise.models import load_model

    model, tok = load_model("concept-lm", device="cpu")
    recipe = random_recipe(model, seed=3)
    rdir = recipe.save_pretrained(tmp_path / "recipe")
    out = tmp_path / "out"
    rc = main(["harness", "--model", "concept-lm", "--recipe", str(rdir), "--strength", "4",
               "--device", "cpu", "--", "--tasks", *TASKS, "--include_path", str(tasks_dir),
               "--output_path", str(out), "--log_samples", "--batch_size", "2"])
    assert rc == 0
    cli: dict[str, list] = {}
    for task in TASKS:
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        cli[task] = flatten(task, [json.loads(x) for x in path.read_text().splitlines()])
    with recipe.apply(model, 4.0):
        python_route = responses(HFLM(pretrained=model, tokenizer=tok, batch_size=2), manager)
    assert cli == python_route
    plain = responses(HFLM(pretrained=model, tokenizer=tok, batch_size=2), manager)
    assert all(a != b for a, b in zip(cli["sw_mc"], plain["sw_mc"]))


@needs_lm_eval
def test_cli_needs_tasks(capsys):
    assert main(["harness", "--model", "concept-lm", "--", "--limit", "1"]) == 2
    assert "--tasks" in capsys.readouterr().err


def mmlu_question(subject: str, i: int) -> MMLUQuestion:
    words = ["apple", "pear", "car", "dog", "rain", "song", "ball", "sun"]
    c = [words[(i + j) % 8] for j in range(4)]
    return MMLUQuestion(subject, f"the {words[i % 8]} is", (c[0], c[1], c[2], c[3]), i % 4)


def letter_tokenizer():
    """The tiny vocabulary plus the MMLU letters and punctuation (ids < 64, the model's vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in (*VOCAB_WORDS, "A", "B", "C", "D", ".", ":"):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


@needs_lm_eval
def test_mmlu_through_lm_eval_matches_the_hand_written_letter_scoring(setup, tmp_path):
    from steerwise.eval.mmlu import evaluate_mmlu, model_choice_scorer
    from steerwise.harness import evaluate, mmlu_tasks

    model, _, recipe = setup
    tok = letter_tokenizer()
    q = mmlu_question
    questions = {s: [q(s, i) for i in range(3)] for s in ("fruit", "road_trip")}
    shots = {s: [q(s, i + 3) for i in range(2)] for s in questions}
    for strength in (0.0, 4.0):
        # lm-eval's MMLU prompts and log-likelihoods equal the hand-written letter scoring's
        res = evaluate(model, tok, recipe, strength, mmlu_tasks(questions, shots, tmp_path),
                       num_fewshot=2, log_samples=True)
        scorer = model_choice_scorer(model, tok, recipe, strength)
        for subject in questions:
            for s in res["samples"][f"steerwise_mmlu_{subject}"]:
                contexts, letters = zip(*s["arguments"])
                assert letters == (" A", " B", " C", " D")
                assert contexts[0] == build_prompt(questions[subject][s["doc_id"]], shots[subject])
                ll = [r[0][0] for r in s["resps"]]
                assert ll == pytest.approx(list(scorer(contexts, letters)), abs=1e-4)
                assert len(set(ll)) == 4
        acc, n, per = mmlu_accuracy(model, tok, recipe, strength, questions, shots, k=2)
        hand = evaluate_mmlu(questions, scorer, shots=shots, k=2, scoring="letter")
        assert n == hand.n == 6
        assert per == pytest.approx(hand.per_subject) and acc == pytest.approx(hand.accuracy)
    with pytest.raises(ValueError, match="only 2 dev examples for 5 shots"):
        mmlu_accuracy(model, tok, None, None, questions, shots, k=5)

class ZeroToxicity:
    name = "zero"

    def score(self, texts):
        import numpy as np

        return np.zeros(len(texts))


@needs_lm_eval
def test_sweep_measures_mmlu_with_lm_eval_and_resumes_old_sweeps(setup, tmp_path):
    from steerwise.eval.generation import GenerationConfig
    from steerwise.eval.mmlu import resolve_mmlu_backend
    from steerwise.eval.sweep import SweepConfig, SweepData, _check_config, evaluate_point

    model, _, recipe = setup
    tok = letter_tokenizer()
    questions = {"fruit": [mmlu_question("fruit", i) for i in range(8)]}
    shots = {"fruit": [mmlu_question("fruit", i) for i in (3, 6)]}
    data = SweepData(toxic_prompts=["the dog"], source_pool=[], target_pool=[], control_pool=[],
                     mmlu_questions=questions, mmlu_shots=shots)
    points = {}
    for backend in ("lm-eval", "steerwise"):
        cfg = SweepConfig(methods=["caa"], mmlu_k=2, mmlu_backend=backend,
                          generation=GenerationConfig(max_new_tokens=2))
        points[backend] = evaluate_point(model, tok, data, ZeroToxicity(), cfg, recipe, 4.0, 0)
    assert points["lm-eval"]["mmlu_backend"] == "lm-eval"
    assert points["lm-eval"]["mmlu"] == pytest.approx(points["steerwise"]["mmlu"])
    assert points["lm-eval"]["mmlu_n"] == 8
    assert resolve_mmlu_backend("auto", "letter") == "lm-eval"
    assert resolve_mmlu_backend("auto", "cloze") == "steerwise"
    with pytest.raises(ValueError, match="needs the steerwise backend"):
        resolve_mmlu_backend("lm-eval", "text")
    # a sweep written before mmlu_backend existed resumes with the steerwise backend only
    cfg = SweepConfig(methods=["caa"]).to_json()
    (tmp_path / "sweep.json").write_text(json.dumps(
        {"config": {k: v for k, v in cfg.items() if k != "mmlu_backend"}, "data": {}}))
    _check_config(tmp_path, cfg, {})
    assert json.loads((tmp_path / "sweep.json").read_text())["config"]["mmlu_backend"] == (
        "steerwise")
    with pytest.raises(ValueError, match="other settings.*mmlu_backend"):
        _check_config(tmp_path, {**cfg, "mmlu_backend": "lm-eval"}, {})


def test_without_lm_eval_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    monkeypatch.delitem(sys.modules, "steerwise.harness", raising=False)
    assert main(["harness", "--model", "concept-lm", "--", "--tasks", "sw_mc"]) == 2
    assert "pip install 'steerwise[harness]'" in capsys.readouterr().err
