"""Reading example texts: ``.txt`` (one text per line) or ``.jsonl`` (a ``text`` field)."""

from __future__ import annotations

import json
from pathlib import Path


def load_texts(path: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a .txt file (one per non-empty line) or a .jsonl file (``field`` of each row).

    Raises ``ValueError`` naming the file and line for unreadable rows, and for an empty file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    texts: list[str] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise ValueError(f"{p}:{lineno}: no string field {field!r}")
                text = row[field]
            else:
                text = line.rstrip("\n")
            if text.strip():
                texts.append(text)
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise ValueError(f"{p} holds no texts")
    return texts
