"""Tiny random models of several families, built from configs (no download)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB_WORDS = (
    "the a an of to and in is was it on for with as at by apple pear banana fruit sweet ripe "
    "car bus train road fast wheel dog cat bird animal runs sleeps rain snow sun cold warm "
    "sky music song band sport ball game red green big small good bad hello world"
).split()

FAMILIES: dict[str, dict] = {
    "gpt2": dict(n_layer=3, n_embd=32, n_head=4, n_positions=128),
    "gpt_neox": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128),
    "llama": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
    "qwen2": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
    "gemma2": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, head_dim=8,
                   max_position_embeddings=128),
    "mistral": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
    "phi3": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128),
    "mixtral": dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=128),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in VOCAB_WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    vocab = 64
    kw = dict(FAMILIES[family], vocab_size=vocab, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    cfg = AutoConfig.for_model(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def random_recipe(model, site: str = "residual", gated: bool = True, seed: int = 1, scale: float = 1.0):
    """A recipe with random CAA vectors and random DSAS gates on every layer of ``site``."""
    from steerwise.gates import DSASGate
    from steerwise.hooks import SiteSteering
    from steerwise.maps import CAAMap
    from steerwise.recipe import ModelIdentity, Recipe
    from steerwise.sites import resolve_sites, site_width

    g = torch.Generator().manual_seed(seed)
    entries = []
    for s in resolve_sites(model, site):
        d = site_width(model, s)
        vec = torch.randn(d, generator=g)
        gate = DSASGate(torch.randn(d, generator=g), torch.randn((), generator=g)) if gated else None
        entries.append(SiteSteering(s, CAAMap(vec), gate, scale))
    return Recipe(ModelIdentity.of(model), entries, "caa", "dsas" if gated else "none", 1.0)
