"""The server's model worker: one thread owns the model and the steering handle and runs a
continuous-batching decode loop.

Requests (``Job``) wait in a bounded queue. The worker admits them into the running batch
between decoding steps: new rows are prefilled together (left-padded), their KV cache is
appended to the running one (both left-padded to a common width), and every step then decodes
all rows at once, each with its own recipe and strength (``handle.route``), sampling settings and
stop conditions. A row leaves the batch as soon as it is done or its client has gone
(``Job.cancel``); leading columns that no remaining row uses are trimmed, so a batch that never
empties does not grow. Models whose cache is not a plain ``DynamicLayer`` stack (sliding-window
caches) are batched without joining: requests that arrive while a batch runs form the next one.

Exactness: a row's tokens do not depend on the other rows. Steering is per row (the kernel), the
attention masks hide other rows' padding, positions are per row, and each row samples from its
own ``torch.Generator``. Greedy outputs equal the same request run alone (tests check exact
tokens for mixed batches).

The recipes are compiled once at start (``steerwise.compile``: identity check, per-site stacks,
position policy) and checked against what the server runs (``SERVER``): CAST recipes are refused,
their gate decides once per sequence at prefill and keeps the decision in per-batch state, which
cannot follow rows joining and leaving a running batch. A recipe that leaves the first token
unsteered (``first_token="skip"``) is exact under joining too: each admitted group of rows is
prefilled in its own call, where every row's first real position is found from its mask.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import max_model_length
from ..compile import Backend, check_backend, compile_steering
from ..generate import _eos_ids, token_strings
from ..hooks import SteeringHandle
from ..recipe import Recipe

log = logging.getLogger("steerwise.server")


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound."""


class EngineClosedError(RuntimeError):
    """The engine has stopped."""


@dataclass
class Event:
    """What the worker tells a request: ``delta`` (new text), ``done`` or ``error``."""

    kind: str
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    explain: dict[str, Any] | None = None
    error: str | None = None
    status: int = 500  # of an error, as an HTTP status


@dataclass
class Job:
    """One generation request and its progress (the progress is the worker's alone)."""

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    recipe: str | None = None
    strength: float = 0.0
    explain: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    # worker state
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    done: bool = False
    eos_hit: bool = False
    stop_text: str | None = None  # the text cut at a stop string
    gate_sites: list[str] = field(default_factory=list)  # explain: the recipe's traced sites
    gates: list[list[float]] = field(default_factory=list)  # per token through the model
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """The client has gone: the worker drops the row at its next step."""
        self.cancelled.set()


def _pad_left(t: Tensor, width: int, dim: int) -> Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters might begin a stop string (not to be sent yet)."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return hold


class Engine:
    """Owns ``model`` + ``tokenizer`` + recipes in one worker thread; ``submit`` jobs to it."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        recipes: dict[str, Recipe] | None = None,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        joining: bool | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0 "
                             f"(got {max_batch}, {max_queue})")
        self.model = model
        self.tokenizer = tokenizer
        self.recipes = dict(recipes or {})
        for recipe in self.recipes.values():
            for entry in recipe.entries:  # serving never trains: frozen stacks, built once
                entry.requires_grad_(False)
        self.compiled = compile_steering(self.recipes, model) if self.recipes else None
        if self.compiled is not None:
            check_backend(self.compiled, SERVER)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context = max_model_length(model, tokenizer)
        self.eos = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (min(self.eos) if self.eos else 0)
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_kw = "logits_to_keep" in params
        self._joining_wanted = joining
        self.joining = False
        self.tok_lock = threading.Lock()  # fast tokenizers are not safe across threads
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._rows: list[Job] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.stats = {"completed": 0, "cancelled": 0, "failed": 0, "prefills": 0, "steps": 0,
                      "max_rows": 0}
        self._recipe_sites = {n: self.compiled.sites_of(n) for n in self.recipes} \
            if self.compiled is not None else {}
        self._thread = threading.Thread(target=self._main, name="steerwise-model", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise self._start_error

    # ---- the request side (any thread) ---------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; raises ``QueueFullError`` when ``max_queue`` jobs already wait for a
        row (beyond the rows the running batch still has free)."""
        if job.recipe is not None and job.recipe not in self.recipes:
            raise KeyError(f"unknown recipe {job.recipe!r}; loaded: {', '.join(self.recipes)}")
        if job.explain and job.recipe is None:
            raise ValueError("explain needs a recipe (an unsteered row has no gates)")
        if job.max_tokens < 1 or not job.prompt_ids:
            raise ValueError("a job needs a prompt and max_tokens >= 1")
        if job.temperature > 0 and job.generator is None:
            job.generator = torch.Generator().manual_seed(
                job.seed if job.seed is not None else secrets.randbits(63))
        with self._cond:
            if self._stop.is_set() or not self._thread.is_alive():
                raise EngineClosedError("the engine has stopped")
            free = self.max_batch - len(self._rows) if self.joining or not self._rows else 0
            if len(self._waiting) >= self.max_queue + max(0, free):  # beyond the free rows
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(job)
            self._cond.notify()

    def load(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._rows), "waiting": len(self._waiting)}

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- the worker ----------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.handle = (SteeringHandle.compiled(self.model, self.compiled, trace=False)
                           if self.compiled is not None else None)
        except BaseException as exc:  # noqa: BLE001 -- re-raised by __init__
            self._start_error = exc
            self._ready.set()
            return
        self._reset_batch()
        with torch.inference_mode():
            self.joining = self._joining_wanted is not False and self._cache_joinable()
            if self._joining_wanted and not self.joining:
                log.warning("this model's KV cache cannot be joined: batching without joining")
        self._ready.set()
        try:
            while not self._stop.is_set():
                new = self._admit()
                try:
                    with torch.inference_mode():
                        if new:
                            self._prefill(new)
                        elif self._rows:
                            self._decode()
                except Exception as exc:  # a model failure: fail the rows, keep serving
                    log.exception("generation step failed")
                    with self._cond:
                        failed = {id(j): j for j in [*self._rows, *new]}
                        self._rows = []
                    self._reset_batch()
                    for job in failed.values():
                        self.stats["failed"] += 1
                        job.emit(Event("error", error=f"generation failed: {exc}"))
        finally:
            self._stop.set()  # whatever ended the loop, nothing more is accepted
            with self._cond:
                stranded = [*self._rows, *self._waiting]
                self._rows, self._waiting = [], deque()
            for job in stranded:
                job.emit(Event("error", error="the server is shutting down", status=503))
            if self.handle is not None:
                self.handle.remove()

    def _reset_batch(self) -> None:
        self._cache: Any = None
        self._mask: Tensor | None = None  # (rows, width) 1 = real token
        self._pos: Tensor | None = None  # (rows,) position of each row's next token
        self._last: Tensor | None = None  # (rows,) token to feed next

    def _cache_joinable(self) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = self._new_cache()
        ids = torch.tensor([[self.pad_id]], device=self.device)
        self._forward(ids, torch.ones_like(ids), torch.zeros_like(ids), cache)
        return isinstance(cache, DynamicCache) and all(
            type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, ids: Tensor, mask: Tensor, pos: Tensor, cache) -> Tensor:
        """Last-position logits (rows, vocab) in float32; the cache is extended in place."""
        kw: dict[str, Any] = {self._cache_kw: cache}
        if self._keep_kw:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **kw)
        return out.logits[:, -1, :].float()

    def _admit(self) -> list[Job]:
        """New jobs for the batch (blocks while there is nothing to do)."""
        with self._cond:
            while not self._rows and not self._waiting and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._stop.is_set() or (self._rows and not self.joining):
                return []
            new: list[Job] = []
            while self._waiting and len(self._rows) + len(new) < self.max_batch:
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self.stats["cancelled"] += 1
                    continue
                new.append(job)
            return new

    def _route(self, jobs: list[Job]) -> None:
        if self.handle is None:
            return
        self.handle.trace_enabled = any(j.explain for j in jobs)
        if self.handle.trace_enabled:  # one forward call's values at a time (see _take_trace)
            self.handle.clear_trace()
        self.handle.route([j.recipe for j in jobs],
                          [j.strength if j.recipe is not None else 0.0 for j in jobs])

    def _take_trace(self) -> tuple[list[str], Tensor]:
        names, values, _ = self.handle.gate_trace()
        return names, values

    def _prefill(self, jobs: list[Job]) -> None:
        self.stats["prefills"] += 1
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for r, j in enumerate(jobs):
            ids[r, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[r, width - len(j.prompt_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), pos.to(self.device)
        cache = self._new_cache()
        self._route(jobs)
        logits = self._forward(ids, mask, pos, cache)
        if any(j.explain for j in jobs):
            names, values = self._take_trace()
            for r, j in enumerate(jobs):
                if j.explain:
                    real = mask[r].bool().cpu()
                    j.gates = self._row_gates(j, names, values[r][real])
        new_pos = torch.tensor([len(j.prompt_ids) for j in jobs], device=self.device)
        with self._cond:
            if self._rows:
                self._join(cache, mask, new_pos)
                self._rows = [*self._rows, *jobs]
            else:
                self._cache, self._mask, self._pos = cache, mask, new_pos
                self._rows = list(jobs)
            self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))
        start = len(self._rows) - len(jobs)
        tokens = self._sample(logits, jobs)
        last = tokens.to(self.device)
        self._last = last if start == 0 else torch.cat([self._last, last])  # type: ignore[list-item]
        self._advance(tokens.tolist(), offset=start)

    def _join(self, cache, mask: Tensor, pos: Tensor) -> None:
        """Append prefilled rows (their cache, mask, positions) to the running batch."""
        width = max(self._mask.shape[1], mask.shape[1])  # type: ignore[union-attr]
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2),
                                    _pad_left(new.values, width, 2)])
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._pos = torch.cat([self._pos, pos])  # type: ignore[list-item]

    def _decode(self) -> None:
        self.stats["steps"] += 1
        jobs = list(self._rows)
        self._mask = torch.cat([self._mask, torch.ones_like(self._mask[:, :1])], dim=1)
        self._route(jobs)
        logits = self._forward(self._last[:, None], self._mask, self._pos[:, None], self._cache)
        if any(j.explain for j in jobs):
            names, values = self._take_trace()
            for r, j in enumerate(jobs):
                if j.explain:
                    j.gates += self._row_gates(j, names, values[r])
        self._pos = self._pos + 1  # type: ignore[operator]
        tokens = self._sample(logits, jobs)
        self._last = tokens.to(self.device)
        self._advance(tokens.tolist(), offset=0)

    def _row_gates(self, job: Job, names: list[str], values: Tensor) -> list[list[float]]:
        """The row's gate values (tokens, sites) at the sites its recipe steers."""
        own = self._recipe_sites[job.recipe] if job.recipe else set()
        keep = [k for k, n in enumerate(names) if n in own]
        if not job.gate_sites:
            job.gate_sites = [names[k] for k in keep]
        return values[:, keep].tolist()

    def _sample(self, logits: Tensor, jobs: list[Job]) -> Tensor:
        out = torch.empty(len(jobs), dtype=torch.long)
        greedy = logits.argmax(-1).cpu()
        for r, j in enumerate(jobs):
            if j.temperature <= 0:
                out[r] = greedy[r]
                continue
            probs = torch.softmax(logits[r].cpu() / j.temperature, -1)
            if j.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p >= j.top_p
                sorted_p[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
            out[r] = torch.multinomial(probs, 1, generator=j.generator)[0]
        return out

    def _advance(self, tokens: list[int], offset: int) -> None:
        """Record each row's new token, send its text, and drop rows that are done."""
        rows = self._rows
        for r in range(offset, len(rows)):
            job, tok = rows[r], tokens[r - offset]
            if job.cancelled.is_set():
                continue
            job.generated.append(tok)
            finish = self._emit_text(job, tok)
            if finish is None and len(job.generated) >= job.max_tokens:
                finish = "length"
            if finish is not None:
                self._finish(job, finish)
        keep = [r for r, j in enumerate(rows) if not (j.cancelled.is_set() or j.done)]
        self.stats["cancelled"] += sum(j.cancelled.is_set() and not j.done for j in rows)
        if len(keep) == len(rows):
            return
        with self._cond:
            if not keep:
                self._rows = []
                self._reset_batch()
                return
            idx = torch.tensor(keep, device=self.device)
            self._rows = [rows[r] for r in keep]
            self._cache.batch_select_indices(idx)
            self._mask, self._pos = self._mask[idx], self._pos[idx]  # type: ignore[index]
            self._last = self._last[idx]  # type: ignore[index]
            if self.joining:  # trim columns no remaining row uses
                used = self._mask.any(0).nonzero()  # type: ignore[union-attr]
                first = int(used[0]) if used.numel() else 0
                if first > 0:
                    self._mask = self._mask[:, first:]  # type: ignore[index]
                    for layer in self._cache.layers:
                        layer.keys = layer.keys[:, :, first:]
                        layer.values = layer.values[:, :, first:]

    def _emit_text(self, job: Job, tok: int) -> str | None:
        """Send the row's new text; 'stop' when it hit EOS or a stop string."""
        if tok in self.eos:
            job.generated.pop()
            job.eos_hit = True
            return "stop"
        with self.tok_lock:
            text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            if cut > job.sent:
                job.emit(Event("delta", text=text[job.sent:cut]))
            job.sent = cut
            job.stop_text = text[:cut]
            return "stop"
        safe = len(text) - _stop_holdback(text, job.stop)
        while safe > job.sent and text[safe - 1] == "\ufffd":  # an incomplete character
            safe -= 1
        if safe > job.sent:
            job.emit(Event("delta", text=text[job.sent:safe]))
            job.sent = safe
        return None

    def _finish(self, job: Job, reason: str) -> None:
        with self.tok_lock:
            text = job.stop_text
            if text is None:
                text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
            if len(text) > job.sent:
                job.emit(Event("delta", text=text[job.sent:]))
            explain = self._explanation(job) if job.explain else None
        n_out = len(job.generated) + int(job.eos_hit)
        usage = {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_out,
                 "total_tokens": len(job.prompt_ids) + n_out}
        job.done = True
        self.stats["completed"] += 1
        job.emit(Event("done", finish_reason=reason, usage=usage, explain=explain))

    def _explanation(self, job: Job) -> dict[str, Any]:
        """Tokens (prompt, then generated) with each one's gate values a_l·h_l per site; None
        for the last generated token, which never went through the model."""
        ids = job.prompt_ids + job.generated
        values: list[list[float] | None] = [list(v) for v in job.gates[: len(ids)]]
        values += [None] * (len(ids) - len(values))
        return {"recipe": job.recipe, "strength": job.strength, "sites": job.gate_sites,
                "tokens": token_strings(self.tokenizer, ids), "n_prompt": len(job.prompt_ids),
                "gates": values}


# What the server runs: no gate outside the kernel (see the module doc); every site the HF hooks
# reach.
SERVER = Backend(
    "the server",
    external_gates=False,
    external_reason="cannot keep it per row: its continuous batching joins and drops rows",
    remedy=", or use `steerwise generate`",
)


def refuse_unbatchable(name: str, recipe: Recipe) -> None:
    """Raise for a recipe the server cannot run (CAST gates: see the module doc)."""
    check_backend(compile_steering({name: recipe}), SERVER)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Wait until nothing runs or waits (tests, benchmarks)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if engine.load() == {"running": 0, "waiting": 0}:
            return True
        time.sleep(0.01)
    return False
