"""Learning an intervention: Adam on the three-term objective, deterministic under a seed.

Every step takes a batch of training prompts, runs it twice in one forward pass — once with
β = +1 and once with β = −1 (``ScaleOptions.betas``) — and minimises
``mean(E + λ_F·F) + λ_M·‖θ‖₁`` (see ``steerwise.scaling.objective``). The model's own weights
are frozen for the duration (their ``requires_grad`` flags are restored afterwards); only the
intervention's parameters are trained. The original (unsteered) answer distributions, needed by
the faithfulness term, are computed once before training.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..identity import ModelIdentity
from ..sites import Site, SiteError, hidden_size, resolve_sites, site_width
from ..tasks.base import TaskExample
from .data import EncodedTask, answer_logits, clean_answer_logits, encode_examples
from .hooks import ScalingHandle
from .interventions import INTERVENTIONS, ScalingIntervention, make_intervention
from .objective import KL_MODES, scaling_objective
from .recipe import ScaleRecipe

SCALE_SITES = ("attn", "mlp", "residual")


@dataclass
class ScaleOptions:
    """Options of ``fit_scaling``; the defaults are the documented ones (docs/scaling.md)."""

    method: str = "activscalar"
    sites: Sequence[str] = ("attn", "mlp")  # any of attn, mlp, residual, or "re:<regex>"
    layers: str | None = None  # all layers
    lambda_f: float = 1.0  # weight of the faithfulness (KL) term
    lambda_m: float = 1e-3  # weight of the ℓ1 minimality term
    margin: float = 2.0  # hinge margin m on the logit difference
    lr: float = 5e-2  # Adam learning rate
    steps: int = 300
    batch_size: int = 32  # prompts per step (each run at every β)
    betas: Sequence[float] = (1.0, -1.0)
    kl: str = "renormalized"  # renormalized | masked | full
    bias: bool = True  # DynScalar: α = w·h + b (False: α = w·h)
    n_positions: int | None = None  # positional methods: default = longest training prompt
    nonzero_tol: float = 1e-2  # |θ| above this counts as a non-zero parameter in reports
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.method not in INTERVENTIONS:
            raise ValueError(
                f"unknown method {self.method!r}; choose from {', '.join(INTERVENTIONS)}"
            )
        if self.kl not in KL_MODES:
            raise ValueError(f"unknown kl mode {self.kl!r}; choose from {', '.join(KL_MODES)}")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 0, batch_size >= 1 and lr > 0")
        if self.lambda_f < 0 or self.lambda_m < 0:
            raise ValueError("lambda_f and lambda_m must be >= 0")
        if not self.betas:
            raise ValueError("betas must name at least one direction, e.g. (1.0, -1.0)")
        for s in self.sites:
            if s not in SCALE_SITES and not s.startswith("re:"):
                raise ValueError(
                    f"unknown site {s!r} for activation scaling; choose from "
                    f"{', '.join(SCALE_SITES)} or 're:<module-regex>[:i]'"
                )

    def to_json(self) -> dict:
        d = asdict(self)
        d["sites"] = list(self.sites)
        d["betas"] = [float(b) for b in self.betas]
        d.pop("progress")
        return d


def scaling_sites(model: nn.Module, kinds: Sequence[str], layers: str | None = None) -> list[Site]:
    """Sites of every requested kind, kind by kind, layer by layer; all of the model's width."""
    sites: list[Site] = []
    for kind in kinds:
        sites.extend(resolve_sites(model, kind, None if kind.startswith("re:") else layers))
    width = hidden_size(model)
    for s in sites:
        if site_width(model, s) != width:
            raise SiteError(f"site {s.name!r} is not {width} wide; scaling needs same-width sites")
    return sites


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Model weights without gradients and in eval mode, restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


@dataclass
class TrainingLog:
    steps: list[int] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    effectiveness: list[float] = field(default_factory=list)
    faithfulness: list[float] = field(default_factory=list)
    minimality: list[float] = field(default_factory=list)

    def add(self, step: int, terms) -> None:
        self.steps.append(step)
        self.total.append(float(terms.total.detach()))
        self.effectiveness.append(float(terms.effectiveness.detach()))
        self.faithfulness.append(float(terms.faithfulness.detach()))
        self.minimality.append(float(terms.minimality.detach()))


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Row indices for each step: the whole set when it fits, else reshuffled epochs."""
    if batch_size >= n:
        for _ in range(steps):
            yield torch.arange(n)
        return
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def fit_scaling(
    model: nn.Module,
    tokenizer,
    examples: Sequence[TaskExample],
    options: ScaleOptions | None = None,
    *,
    init: ScalingIntervention | None = None,
    **overrides,
) -> ScaleRecipe:
    """Train an ActivScalar / SteerVec / DynScalar intervention on ``examples``.

    Parameters start at 0 (the identity) or, with ``init``, at a copy of another intervention of
    the same method, sites and shape (to continue training).
    """
    opts = options or ScaleOptions()
    if overrides:
        opts = ScaleOptions(**{**asdict(opts), **overrides})
    opts.validate()
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)

    data: EncodedTask = encode_examples(tokenizer, examples, opts.n_positions)
    sites = scaling_sites(model, opts.sites, opts.layers)
    iv = make_intervention(opts.method, sites, hidden_size(model), n_positions=data.width,
                           bias=opts.bias)
    if init is not None:
        if init.method != iv.method or [x.name for x in init.sites] != [x.name for x in sites]:
            raise ValueError("init must have the same method and sites as the options ask for")
        iv.load_state_dict(init.state_dict())
    device = next(model.parameters()).device
    iv.to(device)
    betas = torch.tensor([float(b) for b in opts.betas])
    log = TrainingLog()
    t0 = time.perf_counter()
    with frozen(model):
        clean = clean_answer_logits(model, data).to(device)
        optim = torch.optim.Adam(iv.parameters(), lr=opts.lr)
        n_beta = len(betas)
        with ScalingHandle(model, iv, 0.0) as handle, tqdm(
            total=opts.steps, desc=f"scale {opts.method}", disable=not opts.progress,
            leave=False,
        ) as bar:
            for step, rows in enumerate(_batches(len(data), opts.batch_size, opts.steps, gen)):
                batch = data.rows(rows)
                b = len(rows)
                handle.beta = betas.repeat_interleave(b).to(device)
                logits = answer_logits(model, batch.ids.repeat(n_beta, 1),
                                       batch.mask.repeat(n_beta, 1))
                terms = scaling_objective(
                    clean[rows.to(device)].repeat(n_beta, 1), logits,
                    batch.correct.to(device).repeat(n_beta), batch.wrong.to(device).repeat(n_beta),
                    handle.beta, iv.l1(), margin=opts.margin, lambda_f=opts.lambda_f,
                    lambda_m=opts.lambda_m, kl=opts.kl,
                )
                optim.zero_grad(set_to_none=True)
                terms.total.backward()
                optim.step()
                if step % 10 == 0 or step == opts.steps - 1:
                    log.add(step, terms)
                bar.set_postfix(eff=f"{float(terms.effectiveness.detach()):.3f}",
                                faith=f"{float(terms.faithfulness.detach()):.4f}",
                                l1=f"{float(terms.minimality.detach()):.2f}", refresh=False)
                bar.update(1)
    seconds = time.perf_counter() - t0
    iv.cpu()
    tokens = tokenizer.convert_ids_to_tokens(
        data.ids[0][data.mask[0].bool()].tolist()
    )
    info = {
        "training": {
            "n_examples": len(data),
            "n_positions": data.width,
            "seconds": round(seconds, 3),
            "n_parameters": iv.n_parameters(),
            "log": asdict(log),
        },
        "reference_prompt": examples[0].prompt,
        "reference_tokens": [str(t) for t in tokens],
    }
    return ScaleRecipe(ModelIdentity.of(model), iv, options=opts.to_json(), info=info)
