"""Sweep settings: the data a sweep evaluates on and fits from, its configuration, and what a
configuration implies for one (method, gate, seed): the fit sets drawn and the fit options."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from ...strength import AUTO
from ..generation import GenerationConfig
from ..mmlu import MMLUQuestion

BASE = "base"  # the method name of the unsteered point (λ = 0), shared by every front


@dataclass
class SweepData:
    """Everything a sweep evaluates on and fits from. Fit sets are drawn from the pools."""

    toxic_prompts: list[str]
    source_pool: list[str]
    target_pool: list[str]
    control_pool: list[str]
    benign_prompts: list[str] = field(default_factory=list)
    ppl_texts: list[str] = field(default_factory=list)
    ppl_prompts: list[str] = field(default_factory=list)
    ppl_continuations: list[str] = field(default_factory=list)
    mmlu_questions: dict[str, list[MMLUQuestion]] | None = None
    mmlu_shots: dict[str, list[MMLUQuestion]] | None = None
    description: dict[str, Any] = field(default_factory=dict)
    control_pools: dict[str, list[str]] = field(default_factory=dict)  # other named controls
    source_pools: dict[str, list[str]] = field(default_factory=dict)  # other named sources
    target_pools: dict[str, list[str]] = field(default_factory=dict)  # other named targets

    def sizes(self) -> dict[str, int]:
        return {
            "toxic_prompts": len(self.toxic_prompts),
            "benign_prompts": len(self.benign_prompts),
            "source_pool": len(self.source_pool),
            "target_pool": len(self.target_pool),
            "control_pool": len(self.control_pool),
            "ppl_texts": len(self.ppl_texts),
            "ppl_continuations": len(self.ppl_continuations),
            "mmlu_questions": sum(len(v) for v in (self.mmlu_questions or {}).values()),
            **{f"control_pool:{k}": len(v) for k, v in sorted(self.control_pools.items())},
            **{f"source_pool:{k}": len(v) for k, v in sorted(self.source_pools.items())},
            **{f"target_pool:{k}": len(v) for k, v in sorted(self.target_pools.items())},
        }

    def pool(self, kind: str, name: str | None) -> list[str]:
        """The ``kind`` ("source", "target" or "control") pool ``name`` (None: the default)."""
        default, named = {"source": (self.source_pool, self.source_pools),
                          "target": (self.target_pool, self.target_pools),
                          "control": (self.control_pool, self.control_pools)}[kind]
        if name is None:
            return default
        if name not in named:
            raise ValueError(f"unknown {kind} pool {name!r}; this data has: "
                             f"{', '.join(sorted(named)) or 'only the default'}")
        return named[name]

    def control(self, name: str | None) -> list[str]:
        """The control pool ``name`` (None: the default one)."""
        return self.pool("control", name)


@dataclass
class SweepConfig:
    """``gates``: gate kinds or names of ``gate_variants``; a variant is a gate kind with its own
    options: ``{"gate": kind, "control": pool name, "source": pool name, "target": pool name,
    "fit_options": {FitOptions overrides}}`` (pools: names of the data's named pools)
    (``steerwise.eval.cli.parse_gate_variant`` reads them from ``NAME=KIND,key=value,...``)."""

    methods: list[str]
    gates: list[str] = field(default_factory=lambda: ["none", "dsas"])
    gate_variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per method, or per "method+gate" (gated curves often need larger λ than ungated ones);
    # "auto" in a grid: each recipe's default strength (fitted with default_strength="auto")
    strengths: dict[str, list[float | str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    n_fit: int = 32
    site: str = "residual"
    layers: str | None = None
    fit_options: dict[str, Any] = field(default_factory=dict)  # FitOptions fields, nested dicts ok
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scorer: str = "profanity-check"
    ppl_window: int = 256
    ppl_max_tokens: int | None = None
    mmlu_k: int = 5
    mmlu_scoring: str = "letter"
    mmlu_backend: str = "steerwise"  # or "lm-eval" (letter scoring; needs steerwise[harness])
    mmlu_max_length: int | None = None
    batch_size: int = 16
    engine: str = "hf"  # where continuations are sampled: "hf" or "vllm" (sweep/engines.py)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def draw_fit_sets(data: SweepData, n: int, seed: int, control: str | None = None, *,
                  source: str | None = None, target: str | None = None
                  ) -> tuple[list[str], list[str], list[str]]:
    """``n`` source, target and control texts drawn (without replacement) with ``seed``;
    ``control``, ``source``, ``target`` name pools of the data (None: the default ones)."""
    rng = random.Random(seed)
    out = []
    for name, pool in (("source", data.pool("source", source)),
                       ("target", data.pool("target", target)),
                       ("control", data.pool("control", control))):
        if len(pool) < n:
            raise ValueError(f"the {name} pool has {len(pool)} texts, fewer than n_fit={n}")
        out.append(rng.sample(pool, n))
    return out[0], out[1], out[2]


def gate_variant(gate: str, config: SweepConfig) -> dict[str, Any]:
    """The variant named ``gate`` (a plain gate kind is a variant with no options)."""
    variant = config.gate_variants.get(gate, {"gate": gate})
    return {"gate": variant.get("gate", gate), "control": variant.get("control"),
            "source": variant.get("source"), "target": variant.get("target"),
            "fit_options": dict(variant.get("fit_options", {}))}


def build_fit_options(method: str, gate: str, config: SweepConfig):
    """``FitOptions`` for one (method, gate or gate variant) with the sweep's overrides (nested
    dicts set fields of nested option dataclasses; ``per_method`` holds per-method overrides;
    a variant's own options come last)."""
    from ...fit import FitOptions

    variant = gate_variant(gate, config)
    # the sweep steers at its own λ grid: no default strength is searched (and no text held out)
    # unless the grid of (method, gate) holds "auto" or its fit_options ask for it
    auto = AUTO in config.strengths.get(f"{method}+{gate}", config.strengths.get(method, []))
    opts = FitOptions(method=method, gate=variant["gate"], site=config.site, layers=config.layers,
                      batch_size=config.batch_size, default_strength=AUTO if auto else 1.0)
    overrides = dict(config.fit_options)
    per_method = overrides.pop("per_method", {}).get(method, {})
    return opts.updated(_merge(_merge(overrides, per_method), variant["fit_options"]),
                        "fit option (in the sweep's fit_options)")


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` updated by ``b``, nested dicts merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
