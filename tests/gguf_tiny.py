"""A tiny random Gemma-3 model written as a GGUF file with the ``gguf`` package's writer, the way
llama.cpp's converter lays it out (llama.cpp's tensor names, Gemma norm weights
stored as ``1 + w``, a SentencePiece-style vocabulary with byte fallback). Lets the default suite
exercise the GGUF loading path without the 253 MB real model."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a an of to and in is was it on for with as at by apple pear banana fruit sweet ripe "
         "car bus train road fast dog cat bird runs rain snow sun cold warm sky music song hello "
         "world you are such").split()  # noqa: SIM905


def tiny_gemma3(seed: int = 0):
    """A random ``gemma3_text`` model (2 layers, d = 32) whose vocabulary fits ``tiny_vocab``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokens, _, _ = tiny_vocab()
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "gemma3_text", vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=256, sliding_window=64, rope_theta=10000.0,
        pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # the RMSNorm weights are zero at init; make the 1 + w offset matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.1)
    return model


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """Tokens, scores and token types: 5 specials, 256 byte tokens, the words and their letters."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    types = [3, 3, 3, 2, 3]  # gguf: 1 normal, 2 unknown, 3 control, 6 byte
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    pieces = ["▁" + w for w in WORDS] + sorted(set("".join(WORDS))) + ["▁"]
    for p in pieces:
        if p not in tokens:
            tokens.append(p)
            types.append(1)
    scores = [0.0] * 261 + [-float(i) for i in range(len(tokens) - 261)]
    return tokens, scores, types


# Hugging Face Gemma-3 parameter names -> llama.cpp's (gguf-py's tensor map, written out so that
# the helper does not depend on the gguf version knowing Gemma 3)
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``."""
    base, suffix = name.rsplit(".", 1)
    if base in GGUF_NAMES:
        return f"{GGUF_NAMES[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.{suffix}"


def write_gguf(model, path: str | Path, *, arch: str = "gemma3") -> Path:
    """Write ``model`` (from ``tiny_gemma3``) to ``path`` as an F32 GGUF file of architecture
    ``arch`` (another name gives a file that transformers cannot map)."""
    import gguf

    path = Path(path)
    cfg = model.config
    tokens, scores, types = tiny_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny gemma3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":  # tied to the embedding, as in Gemma's GGUF files
            continue
        data = p.detach().float()
        if "norm" in name:
            data = data + 1.0  # llama.cpp stores Gemma's RMSNorm as 1 + w
        w.add_tensor(gguf_name(name), data.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
