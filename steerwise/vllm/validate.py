"""Front-end check of a request's steering fields (a vLLM logits processor that only validates).

vLLM calls ``validate_params`` of every configured logits processor in the front-end process
before a request reaches the engine, and turns its ``ValueError`` into a rejected request (HTTP
400 on the server, an exception from ``LLM.generate``). A bad request caught only in the worker
would stop the engine for everyone. The recipe names come from the ``STEERWISE_VLLM_RECIPES``
environment variable (JSON ``{name: default strength}``), which ``engine_args`` and
``python -m steerwise.vllm.serve`` set; without it, only the field types are checked here.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.sample.logits_processor import LogitsProcessor

from . import known_recipes
from .runtime import XARG_RECIPE, SteeringRequestError, parse_request


class SteeringValidator(LogitsProcessor):
    """Rejects requests naming an unknown recipe or giving a bad strength; changes no logit."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        args = getattr(sampling_params, "extra_args", None) or {}
        known = known_recipes()
        if known is None:  # names unknown here: check the strength with the named recipe allowed
            name = args.get(XARG_RECIPE)
            known = {name: 1.0} if isinstance(name, str) and name else {}
        try:
            parse_request(args, known)
        except SteeringRequestError as exc:
            raise ValueError(str(exc)) from None

    def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: Any) -> Any:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: Any) -> None:
        return None
