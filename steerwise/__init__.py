"""steerwise: activation steering for generative models.

Where (sites) × how (maps) × when (gates). Quick start::

    from steerwise import load_model
    from steerwise.fit import fit
    model, tok = load_model("Qwen/Qwen2.5-1.5B")
    recipe = fit(model, tok, source=toxic, control=neutral, method="caa", gate="dsas")
    with recipe.apply(model, strength=4.0):
        ...
"""

__version__ = "0.1.0"

from .gates import DSASOptions  # noqa: E402
from .models import load_model  # noqa: E402
from .recipe import Recipe, RecipeMismatchError  # noqa: E402
from .sites import resolve_sites  # noqa: E402

__all__ = [
    "DSASOptions", "Recipe", "RecipeMismatchError", "__version__", "load_model", "resolve_sites",
]
