"""DSAS on text-to-image diffusion: the engine's maps and gates on a diffusers pipeline.

Where: blocks of the pipeline's denoiser (UNet attention blocks, DiT transformer blocks);
a gate's token is one spatial position / image token. How and when: the same CAA maps and DSAS
gates as for language models, fitted from prompts (``fit_diffusion``) and applied inside
``pipeline(...)`` (``steer`` / ``generate_images``). See docs/diffusion.md.

Nothing here imports ``diffusers`` at import time; loading a pipeline does.
"""

from .collect import collect_diffusion_activations
from .fit import DiffusionFitOptions, fit_diffusion, fit_from_activations
from .generate import (
    DiffusionSteering,
    GateMaps,
    ImageGeneration,
    generate_images,
    steer,
    without_gates,
)
from .pipelines import load_pipeline
from .sites import denoiser_of, resolve_diffusion_sites

__all__ = [
    "DiffusionFitOptions", "DiffusionSteering", "GateMaps", "ImageGeneration",
    "collect_diffusion_activations", "denoiser_of", "fit_diffusion", "fit_from_activations",
    "generate_images", "load_pipeline", "resolve_diffusion_sites", "steer", "without_gates",
]
