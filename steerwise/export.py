"""Export a recipe to other runtimes: llama.cpp control vectors (``steerwise export``).

llama.cpp (and what builds on it: llama-cpp-python, LM Studio, ollama's runner, ...) steers with a
GGUF *control vector*: one float32 vector ``direction.N`` per layer, added to the output of
decoder layer ``N`` (counted from 0, so ``N`` is also steerwise's ``residual.N``) at every
position. What llama.cpp does with the file (read from its source, docs/export.md cites the
functions):

* ``common_control_vector_load_one`` (common/common.cpp) reads every tensor named
  ``direction.N``: it must be F32 and 1-D, all of one width; ``N = 0`` is an error (the buffer it
  builds starts at layer 1); the vector is multiplied by the file's scale
  (``--control-vector-scaled FILE:SCALE``; ``--control-vector FILE`` is scale 1) and files are
  *summed*. Metadata is not read.
* ``llama_adapter_cvec::apply`` / ``tensor_for`` (src/llama-adapter.cpp) keep one vector per layer
  ``il`` in ``1 .. n_layer - 1`` (never 0), used when ``layer_start <= il <= layer_end``
  (``--control-vector-layer-range``; default 1 .. n_layer).
* ``llm_graph_context::build_cvec`` (src/llama-graph.cpp), called by every model graph (e.g.
  src/models/gemma3.cpp) on the layer output ``l_out`` of layer ``il`` after the residual adds:
  ``cur = cur + direction[il]`` for every token of the batch, the first one included.

A steerwise site ``residual.l`` rewrites ``t`` (the output of decoder layer ``l``) as
``t + λ · a_l · h_l(t) · δ_l(t)`` (``steerwise.kernel``). That is a llama.cpp control vector exactly
when the gate is a constant (``h = 1``: no gate) and the map is additive (``δ = b``, no support):
then ``direction.l = λ · a_l · b_l``. Everything else is refused, saying what would be lost.
Note that llama.cpp steers *every* position, the attention sink (the first token) included.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .recipe import Recipe

LLAMA_CPP = "llama.cpp"
FORMATS = (LLAMA_CPP,)
ARCH = "controlvector"  # general.architecture of a control vector file (tools/cvector-generator)

# Hugging Face model_type -> llama.cpp architecture name (src/llama-arch.cpp LLM_ARCH_NAMES, and
# the converter's choice: convert_hf_to_gguf.py writes Mistral and Mixtral as "llama"). Only
# written as ``controlvector.model_hint`` (informative: llama.cpp does not check it).
LLAMA_CPP_ARCH = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "qwen2": "qwen2",
    "qwen2_moe": "qwen2moe", "qwen3": "qwen3", "phi3": "phi3", "gpt2": "gpt2",
    "gpt_neox": "gptneox",
}


class ExportError(ValueError):
    """A recipe that cannot be written in the requested format; the message says what is lost."""


@dataclass
class ControlVector:
    """Per llama.cpp layer index ``N`` (= steerwise ``residual.N``), the vector added there."""

    directions: dict[int, np.ndarray]
    n_layers: int
    model_hint: str
    strength: float
    metadata: dict[str, str | int | float] = field(default_factory=dict)

    @property
    def n_embd(self) -> int:
        return int(next(iter(self.directions.values())).shape[0])


def _problems(recipe: Recipe, drop_layer_0: bool) -> tuple[list[str], list[int]]:
    """What stands between ``recipe`` and a control vector, and the entries to export."""
    problems, keep = [], []
    n = recipe.model.num_layers
    for i, e in enumerate(recipe.entries):
        site, name = e.site, e.site.name
        if not (name == f"residual.{site.layer}" and site.layer >= 0 and site.io == "output"
                and site.tuple_index is None and site.channel_dim == -1):
            kind = name.split(".", 1)[0] if "." in name else name
            problems.append(
                f"site {name!r} is not a layer output: llama.cpp adds control vectors to the "
                f"residual stream after each layer only, so {kind!r} sites (attention or MLP "
                f"outputs, head inputs, regex sites) cannot be exported (refit with --site residual)")
            continue
        gate = e.gate.linear_form()
        if gate.kind != "one":
            problems.append(
                f"site {name!r} has a {e.gate.kind!r} gate, and the gate is lost: llama.cpp adds "
                f"the vector at every token with the same strength (refit with --gate none)")
            continue
        f = e.map.affine()
        if f.a is not None and bool((f.a != 0).any()):
            problems.append(
                f"site {name!r}: the {e.map.method!r} map is affine (its shift (ω-1)·t + β depends "
                f"on the activation), and llama.cpp only adds a constant vector, so the "
                f"per-dimension scaling would be lost (use caa, iti or mean-act)")
            continue
        if f.lo is not None and f.hi is not None and bool(
                (torch.isfinite(f.lo) | torch.isfinite(f.hi)).any()):
            problems.append(
                f"site {name!r}: the {e.map.method!r} map acts only inside the source support "
                f"(lo <= t <= hi per dimension), and llama.cpp adds the vector whatever the "
                f"activation, so the support would be lost (refit with --no-support)")
            continue
        if site.layer == 0:
            if not drop_layer_0:
                problems.append(
                    f"site 'residual.0': llama.cpp never steers layer 0's output (its loader "
                    f"rejects direction.0), so layer 0 would be lost (refit with --layers "
                    f"1-{n - 1}, or pass --drop-layer-0 to export the other layers)")
            continue
        if site.layer >= n:
            problems.append(f"site {name!r} is past the model's {n} layers")
            continue
        keep.append(i)
    return problems, keep


def control_vector(recipe: Recipe, strength: float | None = None, *,
                   drop_layer_0: bool = False) -> ControlVector:
    """The llama.cpp control vector of ``recipe`` at ``strength`` (default: the recipe's):
    ``direction.l = strength · Σ a_l · b_l`` over the recipe's entries at ``residual.l``.

    Raises ``ExportError`` naming every site that cannot be exported and what would be lost."""
    s = recipe.default_strength if strength is None else float(strength)
    if not np.isfinite(s):
        raise ExportError(f"the strength must be a finite number, got {strength!r}")
    problems, keep = _problems(recipe, drop_layer_0)
    if problems:
        raise ExportError(f"cannot export this {recipe.method}+{recipe.gate} recipe to llama.cpp: "
                          + "; ".join(problems))
    if not keep:
        raise ExportError("cannot export this recipe to llama.cpp: it steers no layer "
                          "that llama.cpp can steer")
    directions: dict[int, np.ndarray] = {}
    for i in keep:
        e = recipe.entries[i]
        b = e.map.affine().b.detach().to(torch.float64).cpu().reshape(-1)
        v = (s * e.scale) * b
        layer = e.site.layer
        directions[layer] = directions.get(layer, 0) + v.numpy()
    dims = {v.shape[0] for v in directions.values()}
    if dims != {recipe.model.hidden_size}:
        raise ExportError(f"cannot export this recipe to llama.cpp: its vectors have width "
                          f"{sorted(dims)}, not the model's hidden size {recipe.model.hidden_size}")
    mtype = recipe.model.model_type
    return ControlVector(
        directions={k: directions[k].astype(np.float32) for k in sorted(directions)},
        n_layers=recipe.model.num_layers,
        model_hint=LLAMA_CPP_ARCH.get(mtype, mtype),
        strength=s,
        metadata={
            "steerwise.version": __version__,
            "steerwise.method": recipe.method,
            "steerwise.gate": recipe.gate,
            "steerwise.strength": s,
            "steerwise.default_strength": float(recipe.default_strength),
            "steerwise.model_type": mtype,
            "steerwise.hidden_size": recipe.model.hidden_size,
            "steerwise.num_layers": recipe.model.num_layers,
            "steerwise.model_name": recipe.model.name_or_path,
        },
    )


def _gguf():
    """The ``gguf`` package (the GGUF writer and reader), or an ExportError saying how to get it."""
    try:
        import gguf
    except ImportError:
        from .models import GGUF_INSTALL

        raise ExportError(f"llama.cpp control vectors are GGUF files, written with the gguf "
                          f"package: {GGUF_INSTALL}") from None
    return gguf


def write_control_vector(cv: ControlVector, out: str | os.PathLike) -> Path:
    """Write ``cv`` as a GGUF control vector (the layout of llama.cpp's cvector-generator:
    ``general.architecture = "controlvector"``, ``controlvector.model_hint``,
    ``controlvector.layer_count``, F32 tensors ``direction.N``). The file appears complete or not
    at all (written to a temporary file beside it, then renamed)."""
    GGUFWriter = _gguf().GGUFWriter

    target = Path(out)
    if target.is_dir():
        raise ExportError(f"{target} is a directory; give a file name such as {target}/vector.gguf")
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {target}: the directory {target.parent} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = GGUFWriter(tmp, ARCH)
        w.add_string(f"{ARCH}.model_hint", cv.model_hint)
        w.add_int32(f"{ARCH}.layer_count", len(cv.directions))
        for key, value in cv.metadata.items():
            if isinstance(value, str):
                w.add_string(key, value)
            elif isinstance(value, int):
                w.add_int32(key, value)
            else:
                w.add_float32(key, float(value))
        for layer, v in cv.directions.items():
            w.add_tensor(f"direction.{layer}", np.ascontiguousarray(v, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_recipe(recipe: Recipe | str | os.PathLike, out: str | os.PathLike,
                  format: str = LLAMA_CPP, *, strength: float | None = None,
                  drop_layer_0: bool = False) -> Path:
    """Export ``recipe`` (a ``Recipe`` or a recipe directory) to ``out`` in ``format``."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; known: {', '.join(FORMATS)}")
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_pretrained(recipe)
    cv = control_vector(recipe, strength, drop_layer_0=drop_layer_0)
    if recipe.first_token == "skip":
        warnings.warn(FIRST_TOKEN_NOTE, stacklevel=2)
    return write_control_vector(cv, out)


FIRST_TOKEN_NOTE = (
    "this recipe leaves the first token unsteered (first_token='skip'), but "
    "llama.cpp adds a control vector at every position: with it llama.cpp also steers the first "
    "token (the attention sink), so it steers somewhat harder than steerwise does with the "
    "recipe (fit with --first-token steer to export exactly what steerwise applies)")


def read_control_vector(path: str | os.PathLike) -> dict[int, np.ndarray]:
    """The ``direction.N`` tensors of a GGUF control vector, checked as llama.cpp's loader
    (``common_control_vector_load_one``) checks them: names ``direction.N`` with ``N >= 1``, F32,
    1-D, one width."""
    gguf = _gguf()
    GGMLQuantizationType, GGUFReader = gguf.GGMLQuantizationType, gguf.GGUFReader

    reader = GGUFReader(path)
    out: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) == 0:
            raise ExportError(f"{path}: tensor {t.name!r} is not a direction.N tensor with N >= 1")
        if t.tensor_type != GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ExportError(f"{path}: tensor {t.name!r} is not a 1-D F32 vector")
        v = np.array(t.data, dtype=np.float32).reshape(-1)
        if out and v.shape[0] != next(iter(out.values())).shape[0]:
            raise ExportError(f"{path}: tensor {t.name!r} has another width than the others")
        out[int(index)] = out.get(int(index), 0) + v
    return out


def llama_cpp_buffer(files: Sequence[tuple[str | os.PathLike, float]], n_layers: int
                     ) -> tuple[int, np.ndarray]:
    """(n_embd, data) as llama.cpp's ``common_control_vector_load`` builds them from
    ``--control-vector-scaled FILE:SCALE`` pairs: each file's vectors times its scale, summed over
    files, laid out layer 1 first (``data[(N-1)·n_embd : N·n_embd]`` is layer N). Hand it to
    ``llama_set_adapter_cvec(ctx, data, len(data), n_embd, 1, n_layers)`` (llama-cpp-python's
    low-level API; older releases call it ``llama_control_vector_apply``)."""
    vectors = [(read_control_vector(f), float(scale)) for f, scale in files]
    widths = {v.shape[0] for d, _ in vectors for v in d.values()}
    if len(widths) != 1:
        raise ExportError(f"control vectors of different widths: {sorted(widths)}")
    n_embd = widths.pop()
    data = np.zeros(n_embd * max(1, n_layers - 1), dtype=np.float32)
    for d, scale in vectors:
        for layer, v in d.items():
            if layer < n_layers:
                data[(layer - 1) * n_embd: layer * n_embd] += v * scale
    return n_embd, data


# ---- the command line ----------------------------------------------------------------------------

def _cmd_export(args) -> int:
    path = export_recipe(args.recipe, args.out, args.format, strength=args.strength,
                         drop_layer_0=args.drop_layer_0)
    cv = read_control_vector(path)
    layers = sorted(cv)
    print(f"wrote {path}: {len(layers)} direction tensors (layers {layers[0]}-{layers[-1]}, width "
          f"{next(iter(cv.values())).shape[0]}); use it with llama.cpp: "
          f"--control-vector-scaled {path}:1.0 (the scale multiplies the exported strength)")
    return 0


def register(sub) -> None:
    from .cli import finite_float

    p = sub.add_parser(
        "export", help="export a recipe to another runtime (llama.cpp control vectors)",
        description="Write an additive, ungated recipe (CAA, ITI, Mean-AcT without a support; "
                    "residual sites) as a llama.cpp GGUF control vector: direction.N = strength "
                    "x a_N x b_N for the recipe's site residual.N. llama.cpp adds it at every "
                    "token, the first one (the attention sink) included (docs/export.md).")
    p.add_argument("--recipe", required=True, help="recipe directory or Hub repo id")
    p.add_argument("--format", choices=FORMATS, default=LLAMA_CPP, help="what to write")
    p.add_argument("--out", required=True, help="the file to write (e.g. vector.gguf)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="strength baked into the vectors (default: the recipe's); llama.cpp's "
                        "--control-vector-scaled FILE:SCALE multiplies it")
    p.add_argument("--drop-layer-0", action="store_true",
                   help="leave out the recipe's layer-0 vector, which llama.cpp cannot apply "
                        "(default: refuse such a recipe)")
    p.set_defaults(func=_cmd_export)
