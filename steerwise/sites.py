"""Where to steer: hook sites of a model.

A *site* is one module of the model whose output (or input) a steering reads and rewrites.
Named kinds resolve per layer through a small table per model family:

``residual``  the residual stream after each decoder layer (the layer's output);
``attn``      the attention block's contribution to the residual stream;
``mlp``       the MLP block's contribution to the residual stream;
``heads``     the input of the attention output projection (concatenated heads), the place
              where a per-head intervention acts.

Any other model works through a regex site ``"re:<module-name-regex>[:<tuple-index>]"`` (the
regex must match whole module names) or ``"re-in:<regex>"`` for a module's first input.

Convention: layer indices count decoder layers from 0. For Gemma-2 the attention and MLP
sites are the *post*-norms (``post_attention_layernorm``/``post_feedforward_layernorm``), the
tensors that are actually added to the residual stream; everywhere else they are the outputs of
the attention and MLP modules themselves.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from torch import nn

SITE_KINDS = ("residual", "attn", "mlp", "heads")

# Child names of a decoder layer, tried in order, for families not listed in FAMILY_OVERRIDES.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn")
_OPROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")

# Families whose attn/mlp contribution is not the attention/MLP module output.
FAMILY_OVERRIDES: dict[str, dict[str, str]] = {
    "gemma2": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "gemma3_text": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
    "gemma3": {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"},
}

# Families tested in this project (tests/test_sites.py); others resolve through the generic rules.
TESTED_FAMILIES = (
    "gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "mistral", "phi3", "mixtral", "qwen2_moe",
)


class SiteError(ValueError):
    """A site that does not exist on this model."""


@dataclass(frozen=True)
class Site:
    """One hook point: ``module`` is a dotted module name of the model.

    ``io`` says whether the output of the module (``"output"``) or its first positional input
    (``"input"``) is steered; ``tuple_index`` selects one element of a tuple output.
    ``layer`` is the decoder-layer index (``-1`` when unknown, e.g. for regex sites).
    ``channel_dim`` is the feature axis (``-1`` for (batch, tokens, d); ``1`` for the
    (batch, channels, h, w) maps of convolutional diffusion blocks).
    """

    name: str
    module: str
    layer: int = -1
    io: Literal["output", "input"] = "output"
    tuple_index: int | None = None
    channel_dim: int = -1

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Site:
        return cls(**data)


def model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "model_type", type(model).__name__))


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list: the ModuleList whose length is the configured layer count."""
    cfg = getattr(model, "config", None)
    n = None
    if cfg is not None:
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n = getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)
    ]
    if n is not None:
        exact = [(name, mod) for name, mod in candidates if len(mod) == n]
        if exact:
            return exact[0]
    if candidates:  # fall back to the longest list
        return max(candidates, key=lambda c: len(c[1]))
    raise SiteError(f"could not find the decoder layers of a {model_type(model)} model")


def num_layers(model: nn.Module) -> int:
    return len(find_layers(model)[1])


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(text_cfg, key, None):
            return int(getattr(text_cfg, key))
    raise SiteError(f"cannot tell the hidden size of a {model_type(model)} model")


def site_width(model: nn.Module, site: Site) -> int:
    """The feature width of a site's activation (hidden size, or a projection's input width)."""
    module = model.get_submodule(site.module)
    if site.io == "input":
        if hasattr(module, "in_features"):
            return int(module.in_features)
        weight = getattr(module, "weight", None)
        if weight is not None and weight.ndim == 2:  # GPT-2 Conv1D stores (in, out)
            return int(weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1])
        raise SiteError(f"cannot tell the input width of {site.module}")
    return hidden_size(model)


def parse_layers(spec: str | int | Sequence[int] | None, n_layers: int) -> list[int]:
    """``None``/"all" → every layer; ``"2-5"`` → 2..5 inclusive; ``"1,3,-1"`` → a list.

    Negative indices count from the end. Out-of-range indices raise ``SiteError``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(n_layers))
    if isinstance(spec, int):
        items: list[int] = [spec]
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            part = part.strip()
            m = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", part) or re.fullmatch(
                r"(-?\d+):(-?\d+)", part
            )
            if m:
                lo, hi = (int(m.group(1)), int(m.group(2)))
                lo, hi = lo % n_layers if lo < 0 else lo, hi % n_layers if hi < 0 else hi
                items.extend(range(lo, hi + 1))
            elif re.fullmatch(r"-?\d+", part):
                items.append(int(part))
            else:
                raise SiteError(f"cannot read layer spec {spec!r}: use 'all', '2-5' or '1,3,5'")
    else:
        items = [int(i) for i in spec]
    out = []
    for i in items:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise SiteError(f"layer {i} is out of range: the model has {n_layers} layers")
        if j not in out:
            out.append(j)
    if not out:
        raise SiteError(f"layer spec {spec!r} selects no layer")
    return sorted(out)


def _child(layer: nn.Module, names: Sequence[str]) -> str | None:
    children = dict(layer.named_children())
    for name in names:
        if name in children:
            return name
    return None


def _kind_module(model: nn.Module, layer_prefix: str, layer: nn.Module, kind: str) -> tuple[str, str]:
    """(dotted module path, io) for a named site kind in one decoder layer."""
    mtype = model_type(model)
    if kind == "residual":
        return layer_prefix, "output"
    override = FAMILY_OVERRIDES.get(mtype, {}).get(kind)
    if override is not None:
        return f"{layer_prefix}.{override}", "output"
    if kind == "mlp":
        child = _child(layer, _MLP_NAMES)
        if child is None:
            raise SiteError(f"no MLP block found in layers of {mtype}")
        return f"{layer_prefix}.{child}", "output"
    attn = _child(layer, _ATTN_NAMES)
    if attn is None:
        raise SiteError(f"no attention block found in layers of {mtype}")
    if kind == "attn":
        return f"{layer_prefix}.{attn}", "output"
    oproj = _child(layer.get_submodule(attn), _OPROJ_NAMES)
    if oproj is None:
        raise SiteError(f"no attention output projection found in layers of {mtype}")
    return f"{layer_prefix}.{attn}.{oproj}", "input"


def resolve_sites(
    model: nn.Module,
    site: str = "residual",
    layers: str | int | Sequence[int] | None = None,
) -> list[Site]:
    """Resolve a site kind (or a ``re:``/``re-in:`` regex) into concrete hook sites."""
    mtype = model_type(model)
    if site.startswith(("re:", "re-in:")):
        return _resolve_regex(model, site)
    if site not in SITE_KINDS:
        raise SiteError(
            f"unknown site {site!r} for model type {mtype!r}; valid choices: "
            f"{', '.join(SITE_KINDS)}, or 're:<module-regex>[:<tuple-index>]' / 're-in:<regex>'"
        )
    prefix, layer_list = find_layers(model)
    chosen = parse_layers(layers, len(layer_list))
    sites = []
    for i in chosen:
        module, io = _kind_module(model, f"{prefix}.{i}", layer_list[i], site)
        sites.append(Site(name=f"{site}.{i}", module=module, layer=i, io=io))  # type: ignore[arg-type]
    return sites


def _resolve_regex(model: nn.Module, spec: str) -> list[Site]:
    io = "input" if spec.startswith("re-in:") else "output"
    body = spec.split(":", 1)[1]
    tuple_index = None
    m = re.fullmatch(r"(.*):(\d+)", body)
    if m and io == "output":
        body, tuple_index = m.group(1), int(m.group(2))
    try:
        pattern = re.compile(body)
    except re.error as exc:
        raise SiteError(f"bad module regex {body!r}: {exc}") from exc
    names = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
    if not names:
        some = [n for n, _ in model.named_modules() if n][:12]
        raise SiteError(
            f"regex {body!r} matches no module of this {model_type(model)} model; "
            f"module names look like: {', '.join(some)} ..."
        )
    prefix, _ = find_layers(model)
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)(\.|$)")
    sites = []
    for n in names:
        lm = layer_re.match(n)
        layer = int(lm.group(1)) if lm else -1
        sites.append(Site(name=n, module=n, layer=layer, io=io, tuple_index=tuple_index))  # type: ignore[arg-type]
    return sites


def describe_sites(model: nn.Module) -> dict[str, str]:
    """Human-readable map kind → module path of layer 0 (for error messages and docs)."""
    prefix, layer_list = find_layers(model)
    out = {}
    for kind in SITE_KINDS:
        try:
            module, io = _kind_module(model, f"{prefix}.0", layer_list[0], kind)
            out[kind] = f"{module} ({io})"
        except SiteError as exc:
            out[kind] = f"unavailable: {exc}"
    return out
