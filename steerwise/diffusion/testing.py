"""Tiny random diffusers pipelines built from configs, for tests, demos and smoke runs.

Nothing is downloaded: the UNet / transformer, VAE, CLIP text encoder and scheduler are built
from small configs with random weights, and the CLIP tokenizer from a word-level vocabulary
written to a temporary directory. Images from these pipelines are noise-like; they exercise every
code path (hooks, CFG batches, timesteps, decoding) at the shapes real checkpoints use.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TINY_WORDS = (
    "a", "an", "the", "of", "on", "in", "at", "to", "with", "and", "next", "two", "photo",
    "picture", "painting", "drawing", "image", "close-up", "blurry", "sharp", "banana",
    "bananas", "bunch", "ripe", "peel", "apple", "apples", "pear", "orange", "fruit", "bowl",
    "car", "red", "bus", "train", "house", "tree", "dog", "cat", "bird", "boat", "sailboat",
    "flower", "sunflower", "mountain", "city", "street", "lake", "green", "yellow", "blue",
    "white", "big", "small", "table", "wooden", "kitchen", "counter", "market", "stall",
    "plate", "basket", "picnic", "blanket", "window", "desk", "lunch", "box", "grass",
    "coffee", "mug", "bicycle", "teddy", "bear", "potted", "plant", "pair", "shoes", "book",
    "wristwatch", "guitar", "loaf", "bread", "cutting", "board", "laptop", "beach", "towel",
    "field", "road", "sky", "sunset", "night", "day",
)

TINY_PIPELINES = ("tiny-sd", "tiny-sd3")


def tiny_clip_tokenizer(directory: str | Path | None = None, model_max_length: int = 32):
    """A ``CLIPTokenizer`` whose merges spell the words of ``TINY_WORDS``.

    Merges build each word from its characters (longest words first, so that their merges win),
    so prompts made of these words cost about one token per word; other words fall back to
    shorter pieces.
    """
    from transformers import CLIPTokenizer

    directory = Path(directory or tempfile.mkdtemp(prefix="steerwise-tiny-tok-"))
    directory.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for i in range(33, 127):  # printable ASCII, as word-inner and as word-final symbols
        vocab.setdefault(chr(i), len(vocab))
    for i in range(33, 127):
        vocab.setdefault(chr(i) + "</w>", len(vocab))
    merges: list[str] = []
    for word in sorted(set(TINY_WORDS), key=lambda w: (-len(w), w)):  # long words first
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{cur} {nxt}"
            if merge not in merges:
                merges.append(merge)
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": model_max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return CLIPTokenizer.from_pretrained(str(directory))


def tiny_clip_text_encoder(tokenizer, seed: int = 0, hidden: int = 32, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8, sample_size=32,
        shift_factor=shift_factor,
    ).eval()


def tiny_unet(seed: int = 0, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    ).eval()


def tiny_sd_pipeline(seed: int = 0):
    """A random ``StableDiffusionPipeline`` (32×32 images, 2 UNet levels, DDIM scheduler)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    tok = tiny_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_clip_text_encoder(tok, seed),
        tokenizer=tok,
        unet=tiny_unet(seed),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
    ).eval()


def tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_sd3_pipeline(seed: int = 0):
    """A random ``StableDiffusion3Pipeline``: SD3 transformer, two CLIP encoders, no T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = tiny_clip_tokenizer()
    tok2 = tiny_clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(seed, shift_factor=0.0),
        text_encoder=tiny_clip_text_encoder(tok, seed, with_projection=True),
        tokenizer=tok,
        text_encoder_2=tiny_clip_text_encoder(tok2, seed + 1, with_projection=True),
        tokenizer_2=tok2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(name: str, seed: int = 0):
    if name == "tiny-sd":
        return tiny_sd_pipeline(seed)
    if name == "tiny-sd3":
        return tiny_sd3_pipeline(seed)
    raise ValueError(f"unknown tiny pipeline {name!r}; known: tiny-sd, tiny-sd3")
