"""Chat-template formatting: fit and generate on a tiny model whose tokenizer has a Jinja template."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB_WORDS, make_model, make_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from steerwise import DSASOptions
from steerwise.chat import format_chat
from steerwise.cli import main
from steerwise.fit import fit
from steerwise.generate import generate

# Role words and the generation prompt in the tiny vocabulary (ids < 64, the model's vocab size).
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }}"
    "{% if not (continue_final_message and loop.last) %} <eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
SOURCE = ["the apple is sweet", "a ripe pear", "the banana is good", "sweet fruit"]
CONTROL = ["the car is fast", "a big bus", "the dog runs", "cold snow"]


def chat_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in VOCAB_WORDS:
        vocab.setdefault(w, len(vocab))
    for w in ("<bos>", "user", "assistant"):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>", bos_token="<bos>")
    out.chat_template = TEMPLATE
    return out


def test_user_and_assistant_rendering():
    tok = chat_tokenizer(adds_bos=False)
    assert format_chat(tok, ["the apple"], "user") == ["<bos>user the apple <eos> assistant"]
    # fit: a complete assistant turn after an empty user message
    assert format_chat(tok, ["the apple"], "assistant") == [
        "<bos>user  <eos> assistant the apple <eos> "]
    # generate: the assistant's reply is continued (no end of turn)
    assert format_chat(tok, ["the apple"], "assistant", for_generation=True) == [
        "<bos>user  <eos> assistant the apple"]


def test_bos_written_once_when_the_tokenizer_adds_it():
    tok = chat_tokenizer(adds_bos=True)
    (text,) = format_chat(tok, ["the apple"], "user")
    ids = tok(text)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_no_template_and_unknown_role_are_clear_errors():
    with pytest.raises(ValueError, match="no chat template"):
        format_chat(make_tokenizer(), ["the apple"], "user")
    with pytest.raises(ValueError, match="unknown chat role 'system'"):
        format_chat(chat_tokenizer(False), ["the apple"], "system")
    model = make_model("llama")
    with pytest.raises(ValueError, match="no chat template"):
        fit(model, make_tokenizer(), SOURCE, CONTROL, method="caa", gate="none", chat="user",
            progress=False)
    with pytest.raises(ValueError, match="no chat template"):
        generate(model, make_tokenizer(), ["the apple"], chat="user", max_new_tokens=2)


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_fit_with_chat_equals_fit_on_rendered_texts(role):
    model, tok = make_model("llama"), chat_tokenizer(adds_bos=True)
    kw = {"method": "caa", "gate": "dsas", "progress": False, "probe_accuracy": False,
          "dsas": DSASOptions(cv_folds=2, n_components=2)}
    chat = fit(model, tok, SOURCE, CONTROL, chat=role, **kw)
    by_hand = fit(model, tok, format_chat(tok, SOURCE, role), format_chat(tok, CONTROL, role), **kw)
    bare = fit(model, tok, SOURCE, CONTROL, **kw)
    for a, b, c in zip(chat.entries, by_hand.entries, bare.entries):
        assert torch.equal(a.map.vector, b.map.vector)
        assert a.diagnostics == b.diagnostics
        assert not torch.allclose(a.map.vector, c.map.vector)
    assert chat.fit_info["options"]["chat"] == role
    assert chat.fit_info["target_is_control"]


@pytest.mark.parametrize("role", ["user", "assistant"])
def test_generate_with_chat_equals_generate_on_rendered_prompts(role):
    model, tok = make_model("llama"), chat_tokenizer(adds_bos=False)
    prompts = ["the apple is", "a big"]
    res = generate(model, tok, prompts, chat=role, max_new_tokens=4)
    rendered = format_chat(tok, prompts, role, for_generation=True)
    by_hand = generate(model, tok, rendered, max_new_tokens=4)
    bare = generate(model, tok, prompts, max_new_tokens=4)
    assert res.prompts == prompts
    assert res.continuations == by_hand.continuations
    assert res.continuations != bare.continuations


def test_cli_chat_without_template_fails_with_the_reason(capsys):
    rc = main(["generate", "--model", "concept-lm", "--chat", "user", "--max-new-tokens", "2",
               "the apple"])
    assert rc == 2
    assert "no chat template" in capsys.readouterr().err
