"""Reading example texts: ``.txt`` (one text per line) or ``.jsonl`` (a ``text`` field)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def _check_file(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {p}")
    if not p.is_file():
        raise IsADirectoryError(f"{p} is a directory, not a text file")
    return p


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8"
        ) from None


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file, line ends removed (``\\n`` or ``\\r\\n``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file and line
    of the first byte that is not UTF-8.
    """
    p = _check_file(path)
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, f"{p}:{lineno}").rstrip("\r\n")
            yield lineno, line.lstrip("\ufeff") if lineno == 1 else line


def read_text(path: str | Path) -> str:
    """The whole of a UTF-8 text file; errors name the file and line like :func:`text_lines`."""
    return "\n".join(line for _, line in text_lines(path))


def parse_json_line(line: str, where: str) -> object:
    """One JSON value, or ``ValueError`` naming ``where`` (``file:line``) and the column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def read_rows(path: str | Path, field: str = "text") -> list[str]:
    """One string per non-blank line of a .txt file, or ``field`` of each row of a .jsonl file
    (a nested ``{field: {"text": ...}}``, as in the original RealToxicityPrompts release, works
    too). Raises ``ValueError`` naming the file and line for an unreadable row."""
    p = Path(path)
    rows: list[str] = []
    for lineno, line in text_lines(p):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            rows.append(line)
            continue
        row = parse_json_line(line, f"{p}:{lineno}")
        value = row.get(field) if isinstance(row, dict) else None
        if isinstance(value, dict):
            value = value.get("text")
        if not isinstance(value, str):
            raise ValueError(f"{p}:{lineno}: no string field {field!r}")  # noqa: TRY004
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
