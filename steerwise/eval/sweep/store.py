"""Resumable results: ``OUT/points.jsonl`` (one finished point per line, appended at once) and
``OUT/sweep.json`` (the settings; a resumed sweep refuses different ones)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

from .spec import SweepConfig

POINTS_NAME = "points.jsonl"
CONFIG_NAME = "sweep.json"
SAMPLES_NAME = "samples.jsonl"  # continuations sampled by another engine, before scoring
# settings a resumed sweep may change (they add points, they do not change existing ones)
_EXTENDABLE = ("methods", "gates", "strengths", "seeds", "gate_variants")


def point_key(method: str, gate: str, seed: int, strength: float) -> str:
    return f"{method}|{gate}|{seed}|{float(strength):.6g}"


def read_points(out_dir: str | Path) -> list[dict[str, Any]]:
    """Points already written (a truncated last line from a kill is ignored)."""
    return _read_jsonl(Path(out_dir) / POINTS_NAME)


def read_samples(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{point key: sampled continuations} already written by ``append_samples``."""
    return {row["key"]: row for row in _read_jsonl(Path(out_dir) / SAMPLES_NAME)}


def append_samples(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Append rows of sampled continuations (one JSON line each, flushed at once)."""
    path = out_dir / SAMPLES_NAME
    cut = False
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as fh:
            fh.seek(-1, 2)
            cut = fh.read(1) != b"\n"  # a line cut by a kill: start a fresh one
    with path.open("a", encoding="utf-8") as fh:
        if cut:
            fh.write("\n")
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        fh.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(f"{path}: skipping a truncated line (an interrupted write)")
    return points


def _drop_partial_line(out_dir: Path) -> None:
    """Cut a last line left unfinished by a kill, so new points start on a fresh line."""
    path = out_dir / POINTS_NAME
    if not path.is_file():
        return
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        warnings.warn(f"{path}: dropping a truncated last line (an interrupted write)")
        path.write_bytes(raw[: raw.rfind(b"\n") + 1])


def _append_point(out_dir: Path, point: dict[str, Any]) -> None:
    with (out_dir / POINTS_NAME).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(point, allow_nan=True) + "\n")
        fh.flush()


def _check_config(out_dir: Path, config: dict[str, Any], data_sizes: dict[str, int]) -> None:
    path = out_dir / CONFIG_NAME
    current = {"config": config, "data": data_sizes}
    if path.is_file():
        old = json.loads(path.read_text())
        # settings added since the sweep was written take their defaults
        defaults = {f.name: f.default for f in dataclasses.fields(SweepConfig)
                    if f.default is not dataclasses.MISSING}
        old_config = {**{k: v for k, v in defaults.items() if k in config},
                      **old.get("config", {})}
        a = {k: v for k, v in old_config.items() if k not in _EXTENDABLE}
        b = {k: v for k, v in config.items() if k not in _EXTENDABLE}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        old_data = old.get("data") or {}
        # named source / target pools added since the sweep was written change no old point
        added = [k for k in data_sizes if k not in old_data
                 and not k.startswith(("source_pool:", "target_pool:"))]
        if added or any(data_sizes.get(k) != v for k, v in old_data.items()):
            diff.append("data sizes")
        old_variants = old_config.get("gate_variants") or {}
        diff += [f"gate variant {n!r}" for n, v in config.get("gate_variants", {}).items()
                 if n in old_variants and old_variants[n] != v]
        if diff:
            raise ValueError(
                f"{out_dir} holds a sweep with other settings ({', '.join(diff)}): resume it with "
                f"the same settings, or write to another directory"
            )
        merged = old_config
        for k in _EXTENDABLE:
            if isinstance(merged.get(k), dict):
                merged[k] = {**merged[k], **config[k]}
            else:
                merged[k] = list(dict.fromkeys(list(merged.get(k, [])) + list(config[k])))
        current = {"config": merged, "data": data_sizes}
    path.write_text(json.dumps(current, indent=2) + "\n")
