"""Built-in prompt sets for the DSAS paper's diffusion experiment: blur only the bananas.

``banana-blurry``: source = photos of bananas, control = photos of other things in the same
settings, target = blurry photos of both; evaluation prompts are held out from the fit sets.
"""

from __future__ import annotations

_SETTINGS = (
    "on a wooden table", "in a bowl", "on a kitchen counter", "at a market stall",
    "on a white plate", "in a basket", "on a picnic blanket", "next to a window",
    "on a desk", "in a lunch box", "on a tree", "in the grass",
)
_OTHERS = (
    "a red car", "a cat", "a coffee mug", "a bicycle", "a teddy bear", "a potted plant",
    "a pair of shoes", "a book", "a dog", "a wristwatch", "a guitar", "a loaf of bread",
)


def _photos(subjects: tuple[str, ...], settings: tuple[str, ...], style: str = "") -> list[str]:
    lead = f"a {style} photo of" if style else "a photo of"
    return [f"{lead} {s} {p}" for s, p in zip(subjects, settings)]


PRESETS: dict[str, dict[str, list[str]]] = {
    "banana-blurry": {
        "source": _photos(("a banana", "bananas", "a bunch of bananas", "a ripe banana") * 3, _SETTINGS),
        "control": _photos(_OTHERS, _SETTINGS),
        "target": _photos(("a banana", "bananas") * 3, _SETTINGS[:6], "blurry")
        + _photos(_OTHERS[:6], _SETTINGS[6:], "blurry"),
        "concept_eval": [
            "a banana on a beach towel", "two bananas on a cutting board",
            "a banana next to a laptop", "a close-up photo of a banana peel",
        ],
        "other_eval": [
            "an apple on a beach towel", "a sailboat on a lake",
            "a laptop on a desk", "a close-up photo of a sunflower",
        ],
    },
}


def preset(name: str) -> dict[str, list[str]]:
    if name not in PRESETS:
        raise ValueError(f"unknown prompt preset {name!r}; known: {', '.join(PRESETS)}")
    return {k: list(v) for k, v in PRESETS[name].items()}
