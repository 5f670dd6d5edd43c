"""Reading example texts: ``.txt`` (one text per line) or ``.jsonl`` (a ``text`` field)."""

from __future__ import annotations

import json
from pathlib import Path


def read_rows(path: str | Path, field: str = "text") -> list[str]:
    """One string per non-blank line of a .txt file, or ``field`` of each row of a .jsonl file
    (a nested ``{field: {"text": ...}}``, as in the original RealToxicityPrompts release, works
    too). Raises ``ValueError`` naming the file and line for an unreadable row."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    rows: list[str] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix != ".jsonl":
                rows.append(line.rstrip("\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
            value = row.get(field) if isinstance(row, dict) else None
            if isinstance(value, dict):
                value = value.get("text")
            if not isinstance(value, str):
                raise ValueError(f"{p}:{lineno}: no string field {field!r}")
            rows.append(value)
    return rows


def load_texts(path: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a .txt file (one per non-empty line) or a .jsonl file (``field`` of each row).

    Raises ``ValueError`` naming the file and line for unreadable rows, and for an empty file.
    """
    texts = [t for t in read_rows(path, field) if t.strip()][:limit]
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts
