"""Which positions a recipe steers: the position policy, shared by every backend.

The first real token of a sequence holds the attention sink on many pretrained models (a residual
norm several times the median token's, the same vector for every text). Whether a recipe steers
it is recorded in the recipe (``"positions": {"first_token": "steer" | "skip"}``):

``"steer"``  every position is steered (what every recipe saved before the policy existed means);
``"skip"``   the first real token of each sequence gets strength 0, so its activations, and
             everything the model computes from them alone, stay bit for bit unsteered.

"First" is a *position*, not a token id: the first position whose attention mask is 1 in a call
that starts a sequence (left padding is skipped over); a decoding step with a KV cache has no
first token. Each backend implements it as a per-token strength of 0 (the kernel's exact-zero
path): the HF hooks from the attention mask of a prefill call, the server through the same hooks
(each joining row is prefilled on its own), vLLM from each request's count of computed tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

FIRST_TOKEN_CHOICES = ("steer", "skip")
# The policy of new recipes (``FitOptions.first_token``, ``steerwise fit --first-token``), chosen
# by measurement (docs/dsas-measured.md, "The first token: steer or skip"): on Gemma 3 270M the
# two policies' fronts tie; on a model whose tokenizer adds no BOS the first token is a word of
# the prompt, and skipping it can undo the steering (the testbed's "You are such a").
DEFAULT_FIRST_TOKEN = "steer"
# What a recipe without a recorded policy means: recipes saved before it existed steered every
# position, and recipes built in code from bare entries do too.
LEGACY_FIRST_TOKEN = "steer"


def check_first_token(value: object, what: str = "first_token") -> str:
    """``value`` if it is a known first-token policy, else a ValueError naming the choices."""
    if value not in FIRST_TOKEN_CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, FIRST_TOKEN_CHOICES))}, "
                         f"got {value!r}")
    return str(value)


def first_token_keep(mask: Tensor | None, batch: int, tokens: int,
                     device: torch.device | str | None = None) -> Tensor:
    """(batch, tokens) float32: 0 at each row's first real position, 1 elsewhere.

    ``mask`` (batch, tokens), 1 = real token, left or right padded; ``None``: no padding, the first
    position is 0. For a call that starts a sequence (a prefill)."""
    if mask is not None:
        device = mask.device
        first = (mask != 0).int().argmax(dim=1)  # the first 1 of each row
    else:
        first = torch.zeros(batch, dtype=torch.long, device=device)
    keep = torch.ones(batch, tokens, device=device)
    keep[torch.arange(batch, device=keep.device), first] = 0.0
    return keep
