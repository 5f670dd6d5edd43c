"""Tests of the activation-scaling task generators (CCC, IOI), the JSONL loader and the shipped
task model (steerwise/assets/task-lm)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from steerwise.tasks.base import (
    FILLER_SENTENCES,
    FILLER_WORDS,
    TaskExample,
    check_single_token,
    count_words,
    load_task_jsonl,
    save_task_jsonl,
)
from steerwise.tasks.ccc import (
    COUNTRY_CAPITALS,
    ccc_examples,
    ccc_pairs,
    ccc_prompt_words,
)
from steerwise.tasks.ioi import NAMES, ioi_examples, ioi_names, ioi_prompt_words

TASK_LM = Path(__file__).resolve().parents[1] / "steerwise" / "assets" / "task-lm"


# ----------------------------------------------------------------------------------- generators


@pytest.mark.parametrize("gen", [ccc_examples, ioi_examples])
@pytest.mark.parametrize("split", ["train", "test"])
def test_deterministic_under_seed(gen, split):
    a = gen(40, seed=3, split=split)
    assert a == gen(40, seed=3, split=split)
    assert a != gen(40, seed=4, split=split)
    assert len(a) == 40 and all(isinstance(e, TaskExample) for e in a)
    assert gen(0, split=split) == []


@pytest.mark.parametrize("gen", [ccc_examples, ioi_examples])
@pytest.mark.parametrize("split", ["train", "test"])
def test_single_word_answers_and_distinct(gen, split):
    for e in gen(200, seed=1, split=split):
        for w in (e.correct, e.wrong):
            assert w.isalpha() and w == w.strip() and " " not in w
        assert e.correct != e.wrong


def test_ccc_answers_are_the_intended_cities():
    cities = set(COUNTRY_CAPITALS.values())
    for e in ccc_examples(300, seed=0, split="train", n_context_sentences=2):
        words = re.findall(r"\w+", e.prompt)
        countries = {w for w in words if w in COUNTRY_CAPITALS}
        assert len(countries) == 1, e.prompt
        country = countries.pop()
        assert words.count(country) == 3  # two context sentences and the question
        assert e.correct == COUNTRY_CAPITALS[country]  # the true capital ...
        assert e.correct not in words  # ... which the prompt never states
        assert [w for w in words if w in cities] == [e.wrong, e.wrong]  # the in-context city
        assert e.prompt.endswith("A:")


def test_ioi_answers_are_the_intended_names():
    orders = set()
    for e in ioi_examples(300, seed=0, split="test", prefix_sentences=1):
        words = e.prompt.replace(",", " ").replace(".", " ").split()
        names = [w for w in words if w in NAMES]
        assert len(names) == 3, e.prompt
        assert names.count(e.wrong) == 2  # subject: mentioned twice
        assert names.count(e.correct) == 1  # indirect object: mentioned once
        assert names[2] == e.wrong  # the subject is the one who gives
        orders.add("ABBA" if names[0] == e.correct else "BABA")
        assert e.prompt.endswith(" to")
    assert orders == {"ABBA", "BABA"}


@pytest.mark.parametrize("split", ["train", "test"])
def test_fixed_prompt_length_within_split(split):
    for n_ctx in (1, 2, 3):
        lens = {
            count_words(e.prompt) for e in ccc_examples(100, split=split, n_context_sentences=n_ctx)
        }
        assert lens == {ccc_prompt_words(n_ctx)}
    lens = {count_words(e.prompt) for e in ioi_examples(100, split=split)}
    assert lens == {ioi_prompt_words()} == {14}


def test_prefix_sentences_change_length_not_task():
    base = {count_words(e.prompt) for e in ioi_examples(50, split="test")}
    for k in (1, 3):
        ex = ioi_examples(50, split="test", prefix_sentences=k)
        assert {count_words(e.prompt) for e in ex} == {b + FILLER_WORDS * k for b in base}
        assert all(sum(s in e.prompt for s in FILLER_SENTENCES) == k for e in ex)
        ex = ccc_examples(50, split="test", prefix_sentences=k)
        assert {count_words(e.prompt) for e in ex} == {ccc_prompt_words(1, k)}
    assert len(FILLER_SENTENCES) >= 3 and all(
        count_words(s) == FILLER_WORDS for s in FILLER_SENTENCES
    )


def test_train_test_disjoint():
    tr, te = set(ccc_pairs("train")), set(ccc_pairs("test"))
    assert tr and te and not tr & te
    assert all(COUNTRY_CAPITALS[c] != w for c, w in tr | te)
    assert len(tr | te) == len(COUNTRY_CAPITALS) * (len(COUNTRY_CAPITALS) - 1)
    assert len(COUNTRY_CAPITALS) >= 40
    for e in ccc_examples(200, split="test"):
        country = next(w for w in re.findall(r"\w+", e.prompt) if w in COUNTRY_CAPITALS)
        assert (country, e.wrong) in te
    ntr, nte = set(ioi_names("train")), set(ioi_names("test"))
    assert ntr and nte and not ntr & nte
    for e in ioi_examples(200, split="test"):
        assert {e.correct, e.wrong} <= nte
    for e in ioi_examples(200, split="train"):
        assert {e.correct, e.wrong} <= ntr
    p_tr = {e.prompt for e in ccc_examples(500, split="train")} | {
        e.prompt for e in ioi_examples(500, split="train")
    }
    p_te = {e.prompt for e in ccc_examples(500, split="test")} | {
        e.prompt for e in ioi_examples(500, split="test")
    }
    assert not p_tr & p_te


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ccc_examples(3, split="dev")
    with pytest.raises(ValueError, match="split"):
        ioi_examples(3, split="validation")
    with pytest.raises(ValueError, match="n_context_sentences"):
        ccc_examples(3, n_context_sentences=0)
    with pytest.raises(ValueError, match="order"):
        ioi_examples(3, order="AABB")


# ----------------------------------------------------------------------------------- JSONL


def test_jsonl_round_trip(tmp_path):
    ex = ccc_examples(5) + ioi_examples(5, prefix_sentences=2)
    p = tmp_path / "t.jsonl"
    save_task_jsonl(ex, p)
    assert load_task_jsonl(p) == ex
    # blank lines are fine, extra fields ignored
    p.write_text('\n{"prompt": "a b", "correct": "x", "wrong": "y", "note": 1}\n\n')
    assert load_task_jsonl(p) == [TaskExample("a b", "x", "y")]


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ("\n\n", "empty"),
        (
            '{"prompt": "a", "correct": "x", "wrong": "y"}\n{not json}\n',
            r"t\.jsonl:2: invalid JSON",
        ),
        ('{"prompt": "a", "correct": "x"}\n', r":1: missing field\(s\) wrong"),
        ('{"prompt": "a", "correct": "x y", "wrong": "z"}\n', r":1: .*'correct'.*single word"),
        ('{"prompt": "a", "correct": "x", "wrong": "x"}\n', r":1: .*both 'x'"),
        ('{"prompt": "", "correct": "x", "wrong": "y"}\n', r":1: field 'prompt'"),
        ('["a", "x", "y"]\n', r":1: expected a JSON object"),
    ],
)
def test_jsonl_errors(tmp_path, content, match):
    p = tmp_path / "t.jsonl"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_task_jsonl(p)


# ----------------------------------------------------------------------------------- task model


@pytest.fixture(scope="module")
def task_lm():
    if not (TASK_LM / "model.safetensors").exists():
        pytest.fail(f"shipped task model missing at {TASK_LM}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TASK_LM)
    model = AutoModelForCausalLM.from_pretrained(TASK_LM).eval()
    return tok, model


def test_task_lm_files():
    names = {p.name for p in TASK_LM.iterdir()}
    assert "model.safetensors" in names and "README.md" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    assert sum(p.stat().st_size for p in TASK_LM.iterdir()) < 8 * 2**20
    cfg = json.loads((TASK_LM / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True


def test_every_answer_word_is_one_token(task_lm):
    tok, _ = task_lm
    all_words = [
        TaskExample("x", c, "Paris" if c != "Paris" else "Rome")
        for c in list(COUNTRY_CAPITALS.values()) + list(NAMES)
    ]
    check_single_token(all_words, tok)
    check_single_token(ccc_examples(100, split="test") + ioi_examples(100, split="test"), tok)
    with pytest.raises(ValueError, match="Springfield"):
        check_single_token([TaskExample("x", "Paris", "Springfield")], tok)


def test_check_single_token_names_multi_token_word():
    class Toy:  # character-level toy tokenizer
        unk_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text.strip()]}

        def convert_ids_to_tokens(self, ids):
            return [chr(i) for i in ids]

    check_single_token([TaskExample("p", "a", "b")], Toy())
    with pytest.raises(ValueError, match="'Mary'.*not a single token"):
        check_single_token([TaskExample("p", "a", "Mary")], Toy())


def test_prompts_tokenize_to_fixed_length(task_lm):
    tok, _ = task_lm
    for ex, n in (
        (ccc_examples(50, split="test"), ccc_prompt_words()),
        (ioi_examples(50, split="test", prefix_sentences=2), ioi_prompt_words(2)),
    ):
        lens = {len(tok(e.prompt, add_special_tokens=False)["input_ids"]) for e in ex}
        assert lens == {n}
        assert tok.unk_token_id not in {i for e in ex for i in tok(e.prompt)["input_ids"]}


@pytest.mark.parametrize("task", ["ccc", "ioi"])
def test_task_lm_clean_accuracy(task_lm, task):
    import torch

    tok, model = task_lm
    ex = (ccc_examples if task == "ccc" else ioi_examples)(50, seed=0, split="test")
    ids = torch.tensor([tok(e.prompt, add_special_tokens=False)["input_ids"] for e in ex])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1]
    c = [tok(" " + e.correct, add_special_tokens=False)["input_ids"][0] for e in ex]
    w = [tok(" " + e.wrong, add_special_tokens=False)["input_ids"][0] for e in ex]
    r = torch.arange(len(ex))
    diff = logits[r, c] - logits[r, w]
    acc = (diff > 0).float().mean().item()
    assert acc >= 0.8, f"{task} clean accuracy {acc:.2f}, mean logit diff {diff.mean():.2f}"
