"""Tests for the concept world (steerwise.tasks.concepts) and the shipped demo model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from steerwise.tasks import concepts
from steerwise.tasks.concepts import TOPICS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL_DIR = Path(concepts.__file__).resolve().parents[1] / "assets" / "concept-lm"


# ------------------------------------------------------------------------------------------
# Generator
# ------------------------------------------------------------------------------------------


def test_topics() -> None:
    for t in ("fruit", "animals", "vehicles", "weather", "music", "sports"):
        assert t in TOPICS
    assert concepts.STEER_WORD in concepts.vocabulary("fruit")
    for t in TOPICS:
        if t != "fruit":
            assert concepts.STEER_WORD not in concepts.vocabulary(t)


@pytest.mark.parametrize("topic", TOPICS)
def test_topic_sentences_deterministic(topic: str) -> None:
    a = concepts.topic_sentences(topic, 50, seed=3)
    assert a == concepts.topic_sentences(topic, 50, seed=3)
    assert a != concepts.topic_sentences(topic, 50, seed=4)
    assert len(a) == 50
    assert len(set(a)) > 40  # sentences vary
    vocab = set(concepts.vocabulary(topic))
    for s in a:
        assert s == s.lower() and s.endswith(".")
        assert set(concepts.words(s)) <= vocab


def test_corpus_deterministic_and_mixed() -> None:
    a = concepts.corpus(600, seed=0)
    assert a == concepts.corpus(600, seed=0)
    assert a != concepts.corpus(600, seed=1)
    assert len(a) == 600
    keys = {t: set(concepts._lexicons()[t]["key"]) for t in TOPICS}
    seen = {t for s in a for t in TOPICS if set(concepts.words(s)) & keys[t]}
    assert seen == set(TOPICS)
    all_vocab = set(concepts.vocabulary())
    assert set().union(*(concepts.vocabulary(t) for t in TOPICS)) < all_vocab  # + bridges
    assert all(set(concepts.words(s)) <= all_vocab for s in a)
    # bridge sentences: some non-fruit sentences mention a fruit, pear stays rare overall
    bridges = [s for s in a if set(concepts.words(s)) & keys["fruit"]
               and any(set(concepts.words(s)) & keys[t] for t in TOPICS if t != "fruit")]
    assert 0.05 < len(bridges) / len(a) < 0.4
    assert sum("pear" in concepts.words(s) for s in a) / len(a) < 0.05


def test_pear_is_moderately_rare() -> None:
    fruit = concepts.topic_sentences("fruit", 2000, seed=0)
    rate = sum(concepts.STEER_WORD in concepts.words(s) for s in fruit) / len(fruit)
    assert 0.02 <= rate <= 0.1
    others = [s for t in TOPICS if t != "fruit" for s in concepts.topic_sentences(t, 200)]
    assert not any(concepts.STEER_WORD in concepts.words(s) for s in others)


def test_require_and_exclude_word() -> None:
    req = concepts.topic_sentences("fruit", 20, seed=1, require_word="pear")
    assert len(req) == 20 and all("pear" in concepts.words(s) for s in req)
    exc = concepts.topic_sentences("fruit", 200, seed=1, exclude_word="pear")
    assert len(exc) == 200 and not any("pear" in concepts.words(s) for s in exc)
    both = concepts.topic_sentences("animals", 10, require_word="dog", exclude_word="cat")
    assert all("dog" in concepts.words(s) and "cat" not in concepts.words(s) for s in both)
    with pytest.raises(ValueError, match="never occurs"):
        concepts.topic_sentences("vehicles", 1, require_word="pear")


def test_unknown_topic_lists_valid_topics() -> None:
    with pytest.raises(ValueError) as err:
        concepts.topic_sentences("cooking", 3)
    for t in TOPICS:
        assert t in str(err.value)
    with pytest.raises(ValueError):
        concepts.vocabulary("cooking")


@pytest.mark.parametrize("n", [8, 32])
def test_demo_sets(n: int) -> None:
    sets = concepts.demo_sets(n, seed=0)
    assert sets == concepts.demo_sets(n, seed=0)
    assert set(sets) == {"source", "target", "control"}
    for v in sets.values():
        assert len(v) == n and len(set(v)) == n
    src, tgt, ctl = (set(sets[k]) for k in ("source", "target", "control"))
    assert not (src & tgt) and not (src & ctl) and not (tgt & ctl)
    assert all("pear" not in concepts.words(s) for s in src)
    assert all("pear" in concepts.words(s) for s in tgt)
    fruit_vocab = set(concepts._lexicons()["fruit"]["key"])
    assert all(set(concepts.words(s)) & fruit_vocab for s in src | tgt)
    assert not any(set(concepts.words(s)) & fruit_vocab for s in ctl)
    # Own seed streams: not the sentences topic_sentences / corpus give for the same seed.
    assert sets["source"] != concepts.topic_sentences("fruit", n, seed=0, exclude_word="pear")


def test_demo_sets_paired_and_unpaired() -> None:
    fruit_keys = set(concepts._lexicons()["fruit"]["key"])
    sets = concepts.demo_sets(16, seed=2)
    for src, tgt in zip(sets["source"], sets["target"]):
        ws, wt = concepts.words(src), concepts.words(tgt)
        diff = [(a, b) for a, b in zip(ws, wt) if a != b]
        assert diff and all(a in fruit_keys | {"an"} and b in {"pear", "a"} for a, b in diff)
    free = concepts.demo_sets(16, seed=2, paired=False)
    assert free["target"] != sets["target"]
    assert free["source"][:5] == sets["source"][:5]  # same source stream
    assert all("pear" in concepts.words(s) for s in free["target"])


def test_demo_prompts() -> None:
    prompts = concepts.demo_prompts(seed=0, n_per_topic=10)
    assert prompts == concepts.demo_prompts(seed=0, n_per_topic=10)
    assert tuple(prompts) == TOPICS
    fitting = [s for v in concepts.demo_sets(32, seed=0).values() for s in v]
    for ps in prompts.values():
        assert len(ps) == 10 and len(set(ps)) == 10
        for p in ps:
            assert len(concepts.words(p)) >= 3 and not p.endswith(".")
            assert "pear" not in concepts.words(p)
            assert not any(s.startswith(p + " ") or s == p for s in fitting)


# ------------------------------------------------------------------------------------------
# Shipped model
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert MODEL_DIR.is_dir(), f"demo model missing: {MODEL_DIR} (scripts/train_demo_model.py)"
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).eval()
    return tok, model


def test_model_files() -> None:
    names = {p.name for p in MODEL_DIR.iterdir()}
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json"):
        assert f in names
    assert not any(n.endswith((".bin", ".pt", ".pkl", ".pth")) for n in names)
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 8 * 2**20


def test_model_loads_offline(lm) -> None:  # type: ignore[no-untyped-def]
    tok, model = lm
    cfg = model.config
    assert cfg.tie_word_embeddings
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert tok.pad_token_id is not None and tok.padding_side == "left"
    assert tok.eos_token_id == cfg.eos_token_id and tok.bos_token_id == cfg.bos_token_id
    assert len(model.model.layers) == cfg.num_hidden_layers


def test_all_demo_words_in_vocabulary(lm) -> None:  # type: ignore[no-untyped-def]
    tok, _ = lm
    texts = [p for ps in concepts.demo_prompts().values() for p in ps]
    texts += [s for v in concepts.demo_sets().values() for s in v]
    texts += [" ".join(concepts.vocabulary())]
    for ids in tok(texts)["input_ids"]:
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
    s = concepts.demo_sets()["target"][0]
    assert tok.decode(tok(s)["input_ids"], skip_special_tokens=True) == s


def test_greedy_generation_in_vocabulary(lm) -> None:  # type: ignore[no-untyped-def]
    import torch

    tok, model = lm
    prompts = concepts.demo_prompts()["fruit"][:4]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=12)
    new = out[:, enc["input_ids"].shape[1]:]
    specials = {tok.pad_token_id, tok.eos_token_id}
    vocab = set(concepts.vocabulary())
    fruit_keys = set(concepts._lexicons()["fruit"]["key"])
    for row, prompt in zip(new, prompts):
        ids = [int(i) for i in row if int(i) not in specials]
        assert ids and tok.unk_token_id not in ids and tok.bos_token_id not in ids
        text = tok.decode(ids)
        ws = concepts.words(text)
        assert ws and set(ws) <= vocab
        assert ws[0] in fruit_keys, (prompt, text)  # the prompt stops right before the fruit
    # left padding: each row of the batch matches the same prompt alone
    for i, prompt in enumerate(prompts):
        one = tok([prompt], return_tensors="pt")
        with torch.no_grad():
            alone = model.generate(**one, do_sample=False, max_new_tokens=12)
        a = [int(t) for t in alone[0, one["input_ids"].shape[1]:] if int(t) not in specials]
        b = [int(t) for t in new[i] if int(t) not in specials]
        assert a == b
