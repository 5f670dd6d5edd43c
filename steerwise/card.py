"""The model card (``README.md``) written into every saved recipe and pushed with it to the Hub:
what the recipe was fitted on and for, what the fit measured per site, and how to load it."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .recipe import Recipe

INTRO = (
    "A [steerwise](https://pypi.org/project/steerwise/) activation-steering recipe: at each site "
    "the hook computes `t' = t + λ · a_l · h_l(t) · (T_l(t) − t)` with the map T_l (how), the "
    "gate h_l (when, 1 without a gate) and the layer scale a_l. It holds no model weights: apply "
    "it to the base model below. Files: `steerwise.json` (settings and fit diagnostics) and "
    "`steering.safetensors` (tensors); loading never runs code."
)
FIT_INTRO = (
    "Per site, as measured at fit time: the gate's cross-validated accuracy (source vs control), "
    "a probe's cross-validated accuracy (source vs target), the layer scale a_l (0 = not "
    "steered), the mean norm of the source activations and of the steering at λ = 1, the median "
    "norm of the source texts' token activations, and the steering's norm at the default "
    "strength relative to it (λ · a_l · ‖delta‖ / median ‖x‖, the gate fully open)."
)
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_COLUMNS = (("gate_accuracy", "gate accuracy (S vs C)"),
            ("probe_accuracy", "probe accuracy (S vs T)"))


def base_model_name(recipe: Recipe) -> str:
    """The name the model was given at fit time (CLI ``--model``), else its ``_name_or_path``."""
    return str(recipe.fit_info.get("model_name") or recipe.model.name_or_path or "")


def _hub_base_model(name: str) -> str | None:
    """``name`` when it reads as a Hub model id (``namespace/name``, not a local directory)."""
    if _REPO_ID.match(name) and not Path(name).exists():
        return name
    return None


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return f"{value:.{digits}f}"
    return "–"


def fit_table(recipe: Recipe) -> str:
    """Per site: gate and probe accuracy, layer scale, activation and steering norms, and the
    steering's norm at the default strength relative to the median token norm (markdown)."""
    from .strength import relative_strength

    rows = recipe.diagnostics()
    cols = [(k, title) for k, title in _COLUMNS if any(k in r for r in rows)]
    head = ["site", *(t for _, t in cols), "scale a_l", "mean ‖source‖", "‖delta‖",
            "median ‖x‖", f"λ·a_l·‖delta‖ / median ‖x‖ (λ = {recipe.default_strength:.3g})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['site']}`", *(_num(r.get(k)) for k, _ in cols), _num(r["scale"], 2),
                 _num(r.get("source_norm"), 2), _num(r.get("delta_norm"), 2),
                 _num(r.get("token_norm_median"), 2),
                 _num(relative_strength(r, recipe.default_strength), 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def strength_section(recipe: Recipe) -> str | None:
    """How the default strength was chosen (``fit_info["strength"]``), as markdown, or None."""
    info = recipe.fit_info.get("strength")
    if not isinstance(info, dict) or "probes" not in info:
        return None
    capped = (" The search stopped at its cap (strength_max): larger strengths were not tried."
              if info.get("capped") else "")
    rows = "\n".join(f"| {p['strength']:.4g} | {p['perplexity']:.4g} | "
                     f"{'yes' if p['perplexity'] <= info['limit'] else 'no'} |"
                     for p in sorted(info["probes"], key=lambda p: p["strength"]))
    return (
        "## Default strength\n\n"
        f"λ = {info['strength']:.4g}: the largest strength found whose perplexity on held-out "
        f"benign texts ({info.get('held_out', 'held-out texts')}; {info['n_tokens']} tokens) "
        f"stays within +{info['budget']:.1%} of the unsteered perplexity "
        f"({info['base_perplexity']:.4g}, limit {info['limit']:.4g}), searched on a log scale "
        f"(steps of 4 from λ = 1, then bisection) in {info['seconds']:.1f} s.{capped}\n\n"
        "| λ | held-out perplexity | within budget |\n|---|---|---|\n" + rows
    )


def model_card(recipe: Recipe, load_from: str | None = None, *, repo_id: str | None = None) -> str:
    """Markdown with Hub metadata (YAML front matter). ``repo_id``: the Hub repo the card is
    pushed to; ``load_from``: the directory named in the loading example otherwise."""
    info = recipe.fit_info
    opts = info.get("options", {}) or {}
    base = base_model_name(recipe)
    hub_base = _hub_base_model(base)
    where = repo_id or load_from or "path/to/this/recipe"
    strength = f"{recipe.default_strength:g}"
    model_arg = base or "MODEL"
    ident = recipe.model
    steered = sum(1 for e in recipe.entries if e.scale > 0)

    meta = ["---", "library_name: steerwise", "tags:", "- steerwise", "- activation-steering",
            f"- {recipe.method}"]
    if recipe.gate != "none":
        meta.append(f"- {recipe.gate}")
    if hub_base:
        meta.append(f"base_model: {hub_base}")
    meta.append("---")

    if "n_source" not in info:
        data = "not recorded"
    elif info.get("target_is_control"):
        data = (f"{info['n_source']} source texts (S) and {info.get('n_control', 0)} control "
                f"texts (C, also the target T)")
    else:
        data = (f"{info['n_source']} source (S), {info.get('n_target', 0)} target (T) and "
                f"{info.get('n_control', 0)} control (C) texts")
    shape = f"{ident.model_type}, {ident.num_layers} layers, hidden size {ident.hidden_size}"
    kind = f" ({opts['site']})" if opts.get("site") else ""
    facts = [
        ("base model", f"`{base}` ({shape})" if base else shape),
        ("method (how)", f"`{recipe.method}`"),
        ("gate (when)", f"`{recipe.gate}`"),
        ("sites (where)", f"{len(recipe.entries)} sites{kind}, {steered} with a_l > 0"),
        ("fit data", data),
        ("default strength λ", strength + (" (chosen on held-out text: see Default strength)"
                                           if "strength" in info else "")),
        ("steerwise version", __version__),
    ]
    chat = opts.get("chat")
    if chat:
        how = f"texts rendered as `{chat}` messages: generate with `--chat {chat}`"
        facts.append(("chat template", how))
    if recipe.gate in ("dsas", "dsas-adaptive") and isinstance(opts.get("dsas"), dict):
        facts.append(("gate threshold τ", f"{opts['dsas'].get('threshold', '?')}"))

    parts = [
        "\n".join(meta),
        f"# Steering recipe: {recipe.method} + {recipe.gate}" + (f" for {base}" if base else ""),
        INTRO,
        "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in facts),
        f"## Fit\n\n{FIT_INTRO}\n\n{fit_table(recipe)}",
    ]
    section = strength_section(recipe)
    if section:
        parts.append(section)
    if info.get("warning"):
        parts.append(f"**Fit warning:** {info['warning']}")
    parts.append(
        "## Use\n\n```python\n"
        "from steerwise import Recipe, load_model\n"
        "from steerwise.generate import generate\n\n"
        f'model, tok = load_model("{model_arg}")\n'
        f'recipe = Recipe.from_pretrained("{where}")\n'
        f"with recipe.apply(model, strength={strength}):\n"
        "    ...  # any forward pass or model.generate is steered here\n"
        f'print(generate(model, tok, ["Hello"], recipe, {strength}'
        + (f', chat="{chat}"' if chat else "") + ").continuations[0])\n```\n\n"
        "```bash\n"
        f"steerwise generate --model {model_arg} --recipe {where} --strength {strength}"
        + (f" --chat {chat}" if chat else "") + ' --compare "Hello"\n'
        f"steerwise harness --model {model_arg} --recipe {where} --strength {strength} "
        "-- --tasks TASKS   # lm-evaluation-harness\n```"
    )
    return "\n\n".join(parts) + "\n"
