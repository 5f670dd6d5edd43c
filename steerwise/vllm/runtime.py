"""Steering inside a loaded vLLM model: hooks on decoder layers, per-token routing buffers.

Pure torch (no vLLM import): the worker (``steerwise.vllm.worker``) builds one ``VllmSteering``
after the model is loaded and, before every forward pass, writes each token's recipe index and
strength into two persistent buffers (``fill``). The hooks read those buffers and run the shared
kernel (``steerwise.kernel``); they have no Python branch on tensor values, so vLLM's
``torch.compile`` traces them into its graph, and a token with strength 0 gets its activation
back bit for bit (``torch.where``). The recipes are compiled by ``steerwise.compile`` (identity
check, per-site stacks, position policy) and checked against what this backend runs (``vllm_backend``).

Position policy: a recipe with ``first_token="skip"`` gets strength 0 on the first token of each
request, the token of a step whose request had no computed token before it (``fill``'s
``computed``: the V1 runner's ``num_computed_tokens``).

Sites, per decoder layer ``l`` (vLLM flattens tokens: activations are ``(num_tokens, d)``):

``residual.l``  the layer returns ``(hidden, residual)``; the residual stream after the layer is
                their sum (what the next layer's fused add-norm computes). The gate reads the
                sum, the steering is added to ``hidden``.
``attn.l``      the output of ``self_attn`` (its contribution to the residual stream);
``mlp.l``       the output of ``mlp``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..compile import Backend, check_backend, compile_steering
from ..hooks import check_strength
from ..identity import ModelIdentity
from ..kernel import SiteStack, steer, steer_terms
from ..recipe import Recipe
from ..sites import FAMILY_OVERRIDES, Site

log = logging.getLogger(__name__)

# request fields (SamplingParams.extra_args; over HTTP: vllm_xargs)
XARG_RECIPE = "steering_recipe"
XARG_STRENGTH = "steering_strength"

SUPPORTED_KINDS = ("residual", "attn", "mlp")
# model types whose decoder layers return (hidden, residual), tested token for token against the
# HF path (tests/test_vllm.py); in qwen2/llama the attn/mlp outputs are the blocks' contributions
# to the residual stream, in gemma3_text (post-norm blocks) only residual sites are steered
TESTED_MODEL_TYPES = ("qwen2", "llama", "gemma3_text")
_CHILD = {"attn": "self_attn", "mlp": "mlp"}
_SITE_RE = re.compile(r"(residual|attn|mlp|heads)\.(\d+)")


class SteeringRequestError(ValueError):
    """A request whose steering fields are invalid (unknown recipe, bad strength)."""


def parse_request(
    extra_args: Mapping[str, Any] | None, recipes: Mapping[str, float]
) -> tuple[str | None, float]:
    """``(recipe name or None, strength)`` of one request's ``extra_args``.

    ``recipes`` maps each loaded recipe's name to its default strength (used when a request names
    a recipe but no strength). No recipe, or strength 0, is an unsteered request.
    """
    args = extra_args or {}
    name = args.get(XARG_RECIPE)
    raw = args.get(XARG_STRENGTH)
    if name is None or name == "":
        if raw not in (None, 0, 0.0, "0"):
            raise SteeringRequestError(
                f"{XARG_STRENGTH}={raw!r} given without {XARG_RECIPE}: "
                "name the recipe to steer with"
            )
        return None, 0.0
    if not isinstance(name, str) or name not in recipes:
        known = ", ".join(map(repr, recipes)) or "none"
        raise SteeringRequestError(
            f"unknown steering recipe {name!r} ({XARG_RECIPE}); this engine loaded: {known}"
        )
    if raw is None:
        return name, float(recipes[name])
    try:
        return name, check_strength(raw, XARG_STRENGTH)
    except ValueError as exc:
        raise SteeringRequestError(str(exc)) from None


def parse_site(name: str) -> tuple[str, int]:
    """``(kind, layer)`` of a recipe site name such as ``residual.3``; refuses the rest."""
    m = _SITE_RE.fullmatch(name)
    if m is None or m.group(1) not in SUPPORTED_KINDS:
        raise ValueError(
            f"site {name!r} is not supported in vLLM: steerwise.vllm steers the named sites "
            f"{', '.join(k + '.<layer>' for k in SUPPORTED_KINDS)} (not 'heads' or regex sites)"
        )
    return m.group(1), int(m.group(2))


def find_decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    """The vLLM model's decoder-layer list (its length is the configured layer count)."""
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and name.endswith("layers"):
            return name, mod
    raise ValueError(f"cannot find the {n_layers} decoder layers of this vLLM model "
                     f"({type(model).__name__})")


class RoutingState(nn.Module):
    """Per-token recipe index and strength, persistent (fixed address for CUDA graphs), filled
    outside the compiled region before every forward pass."""

    def __init__(self, max_tokens: int, device: torch.device | str) -> None:
        super().__init__()
        self.register_buffer("strength", torch.zeros(max_tokens, device=device), persistent=False)
        self.register_buffer("index", torch.zeros(max_tokens, dtype=torch.long, device=device),
                             persistent=False)
        cuda = torch.device(device).type == "cuda"
        self._cpu_strength = torch.zeros(max_tokens, pin_memory=cuda)  # page-locked: truly
        self._cpu_index = torch.zeros(max_tokens, dtype=torch.long, pin_memory=cuda)  # async
        # the asynchronous copies of one step must finish before the next step rewrites the
        # page-locked source (with async scheduling the CPU runs a step ahead of the GPU)
        self._copied = torch.cuda.Event() if cuda else None
        # True while a CUDA graph is being captured (never on CPU)
        self.capturing = torch.cuda.is_current_stream_capturing if cuda else _never
        self.dirty = True  # buffers may hold nonzero strengths
        self.active: frozenset[int] = frozenset()  # recipes with a nonzero strength this step


def _never() -> bool:
    return False


@dataclass
class _SiteHook:
    kind: str
    layer: int
    stack: SiteStack
    recipes: frozenset[int]  # the recipes that steer this site


class VllmSteering:
    """Several recipes installed on one vLLM model (one per worker / tensor-parallel rank)."""

    def __init__(
        self,
        model: nn.Module,
        recipes: Mapping[str, Recipe],
        *,
        model_type: str,
        hidden_size: int,
        num_layers: int,
        max_tokens: int,
        device: torch.device | str,
    ) -> None:
        if not recipes:
            raise ValueError("steerwise.vllm: give at least one recipe")
        self.names = list(recipes)
        self.defaults = {n: float(r.default_strength) for n, r in recipes.items()}
        self.max_tokens = int(max_tokens)
        compiled = compile_steering(
            recipes, ModelIdentity(model_type=model_type, hidden_size=hidden_size,
                                   num_layers=num_layers))
        check_backend(compiled, vllm_backend(model_type, hidden_size))
        self.compiled = compiled
        # the position policy: per-step work only when a recipe leaves the first token unsteered
        self.skips_first = compiled.skips_first
        self._skip = np.array(compiled.skip_first, dtype=bool)
        if model_type not in TESTED_MODEL_TYPES:
            log.warning("steerwise.vllm: model type %r is untested (tested: %s); its decoder "
                        "layers must return (hidden, residual) like Qwen2/Llama", model_type,
                        ", ".join(TESTED_MODEL_TYPES))
        self.state = RoutingState(self.max_tokens, device)
        prefix, layers = find_decoder_layers(model, num_layers)
        by_site = {parse_site(cs.site.name): cs for cs in compiled.sites}
        self.hooks: list[Any] = []
        self.sites: list[_SiteHook] = []
        try:
            for (kind, layer), cs in sorted(by_site.items(), key=lambda kv: kv[0][::-1]):
                module = layers[layer]
                if type(module).__name__ == "PPMissingLayer":
                    continue  # another pipeline stage holds this layer
                if kind != "residual":
                    child = getattr(module, _CHILD[kind], None)
                    if child is None:
                        raise ValueError(f"site {kind}.{layer}: {prefix}.{layer} has no "
                                         f"{_CHILD[kind]!r} block")
                    module = child
                site = _SiteHook(kind, layer, cs.stack.to(device), cs.recipes)
                self.sites.append(site)
                self.hooks.append(module.register_forward_hook(self._make_hook(site)))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    # ---- per step, outside the compiled region --------------------------------------------------
    def fill(self, routes: Sequence[tuple[int, float]], counts: Sequence[int] | np.ndarray,
             num_tokens: int, computed: Sequence[int] | np.ndarray | None = None) -> None:
        """Write the buffers for one forward pass: request ``i`` owns the next ``counts[i]``
        tokens and is steered by recipe ``routes[i][0]`` at strength ``routes[i][1]``; tokens
        past the requests (padding) and up to ``num_tokens`` get strength 0.

        ``computed[i]``: how many tokens of request ``i`` were computed before this step (needed
        when a recipe leaves the first token unsteered: a request with none gets strength 0 on
        its first token here)."""
        st = self.state
        if num_tokens > self.max_tokens:
            raise ValueError(f"steerwise.vllm: {num_tokens} tokens in one step, buffers hold "
                             f"{self.max_tokens}")
        st.active = frozenset(r for r, s in routes if s != 0.0)
        if not st.active:
            if st.dirty:
                st.strength.zero_()
                st.dirty = False
            return
        counts = np.asarray(counts, dtype=np.int64)
        n = int(counts.sum())
        if st._copied is not None:
            st._copied.synchronize()
        idx = np.repeat(np.fromiter((r for r, _ in routes), np.int64, len(routes)), counts)
        val = np.repeat(np.fromiter((s for _, s in routes), np.float32, len(routes)), counts)
        if self.skips_first:
            if computed is None:
                raise ValueError("steerwise.vllm: a recipe leaves the first token unsteered "
                                 "(first_token='skip'): fill() needs each request's count of "
                                 "computed tokens")
            recipe = np.fromiter((r for r, _ in routes), np.int64, len(routes))
            starts = np.cumsum(counts) - counts
            first = (np.asarray(computed, dtype=np.int64)[:len(routes)] == 0) & (counts > 0) \
                & self._skip[recipe]
            val[starts[first]] = 0.0
        st._cpu_index[:n] = torch.from_numpy(idx)
        st._cpu_strength[:n] = torch.from_numpy(val)
        st._cpu_strength[n:num_tokens] = 0.0
        st._cpu_index[n:num_tokens] = 0
        st.strength[:num_tokens].copy_(st._cpu_strength[:num_tokens], non_blocking=True)
        st.index[:num_tokens].copy_(st._cpu_index[:num_tokens], non_blocking=True)
        if st._copied is not None:
            st._copied.record()
        st.dirty = True

    # ---- hooks (traced by torch.compile: no branch on tensor values) ----------------------------
    # Every per-step value a hook reads is a slice of the routing buffers (state.strength,
    # state.index), rewritten in place by `fill` before each forward; everything else it reads
    # (stack, the site's recipes) is fixed at install time. Run eagerly, a hook returns at once
    # when no token of the step uses a recipe that steers its site (a check on Python state,
    # state.active). That check is skipped while torch.compile traces (a trace must not depend on
    # one step's Python state: vLLM runs the traced graph without re-checking guards) and while a
    # CUDA graph is captured (capture runs see no steered request; the graph must hold the
    # steering ops for every replay): the graph always computes, and tokens with strength 0 come
    # out unchanged. docs/vllm.md, "Compiled mode and CUDA graphs".
    def _make_hook(self, site: _SiteHook):
        state = self.state
        stack = site.stack
        mine = site.recipes
        what = f"steerwise.vllm site {site.kind}.{site.layer}"

        if site.kind == "residual":
            def residual_hook(module: nn.Module, args: tuple, output: Any) -> Any:
                if not (torch.compiler.is_compiling() or state.capturing()) and not (
                        mine & state.active):
                    return output
                if not (isinstance(output, tuple) and len(output) == 2):
                    raise TypeError(f"{what}: expected the decoder layer to return (hidden, "
                                    f"residual), got {type(output).__name__}")
                hidden, residual = output
                n = hidden.shape[0]
                strength, index = state.strength[:n], state.index[:n]
                h = hidden.float()
                coef, delta, _ = steer_terms(h + residual.float(), stack, strength, index)
                new = torch.where(coef != 0, torch.addcmul(h, coef, delta), h).to(hidden.dtype)
                return new, residual

            return residual_hook

        def block_hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not (torch.compiler.is_compiling() or state.capturing()) and not (
                    mine & state.active):
                return output
            if not isinstance(output, Tensor):
                raise TypeError(f"{what}: expected a tensor output, got {type(output).__name__}")
            n = output.shape[0]
            out, _ = steer(output, stack, state.strength[:n], state.index[:n])
            return out

        return block_hook


def vllm_backend(model_type: str, hidden_size: int) -> Backend:
    """What ``steerwise.vllm`` runs on a model of ``model_type``: gates inside the kernel only
    (no per-sequence state), and the decoder-layer sites ``residual``/``attn``/``mlp`` (the last
    two only where they are the block's output, not a post-norm)."""

    def site_problem(site: Site, dim: int) -> str | None:
        try:
            kind, _ = parse_site(site.name)
        except ValueError as exc:
            return str(exc)
        if kind != "residual" and model_type in FAMILY_OVERRIDES:
            return (f"in {model_type} the {kind} contribution is a post-norm, not the block's "
                    f"output; steerwise.vllm steers {kind} sites only on families like "
                    "qwen2 and llama")
        if dim != hidden_size:
            return f"width {dim}, the model's hidden size is {hidden_size}"
        return None

    return Backend("steerwise.vllm", external_gates=False,
                   external_reason="does not run gates outside the kernel",
                   site_problem=site_problem)
