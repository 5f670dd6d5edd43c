"""Learned activation scaling (Stoehr et al., 2024): where does a model decide?

Train tiny interventions that flip a next-token prediction between a correct and a wrong answer —
one scalar per site, layer and position (``ActivScalar``), one vector (``SteerVec``), or a scalar
computed from the activation itself (``DynScalar``) — under a three-term objective
(effectiveness, faithfulness, minimality). See docs/scaling.md.

    from steerwise.scaling import ScaleOptions, fit_scaling, evaluate_scaling
    recipe = fit_scaling(model, tok, train_examples, ScaleOptions(method="activscalar"))
    report = evaluate_scaling(model, tok, recipe, test_examples)
    with recipe.apply(model, beta=1.0):
        ...  # the model now prefers the wrong answer
"""

from .data import EncodedTask, encode_examples, load_task
from .hooks import ScalingHandle
from .interventions import (
    INTERVENTIONS,
    ActivScalar,
    DynScalar,
    PromptTooLongError,
    ScalingIntervention,
    SteerVec,
    make_intervention,
)
from .metrics import clean_accuracy, evaluate_scaling
from .objective import (
    KL_MODES,
    effectiveness_term,
    faithfulness_term,
    logit_difference,
    scaling_objective,
)
from .recipe import ScaleRecipe
from .train import ScaleOptions, fit_scaling, scaling_sites

__all__ = [
    "INTERVENTIONS", "KL_MODES", "ActivScalar", "DynScalar", "EncodedTask", "PromptTooLongError",
    "ScaleOptions", "ScaleRecipe", "ScalingHandle", "ScalingIntervention", "SteerVec",
    "clean_accuracy", "effectiveness_term", "encode_examples", "evaluate_scaling",
    "faithfulness_term", "fit_scaling", "load_task", "logit_difference", "make_intervention",
    "scaling_objective", "scaling_sites",
]
