"""What several stages share and none owns: the one-line text of an error, text tables, sizes.

Kept free of onnx, onnxruntime and numpy so that any module (the CLI's start-up included) can use
it without paying for those imports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# An exception's text in a one-line message is cut here: a protobuf or onnxruntime error can be
# kilobytes of dump, and a message is for reading.
FIRST_LINE_LIMIT = 300


def first_line(error: BaseException, limit: int = FIRST_LINE_LIMIT) -> str:
    """The first line of an exception's text (its type's name if it has none), at most ``limit``
    characters."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:limit]


def format_table(
    header: Sequence[str] | None,
    rows: Iterable[Sequence],
    *,
    indent: str = "",
    rule: bool = True,
    right: Iterable[int] = (),
) -> list:
    """Lines of a plain-text table: columns two spaces apart and as wide as their widest cell, a
    rule of dashes under the header (``rule=False``: none; ``header=None``: no header at all),
    columns whose index is in ``right`` right-aligned, trailing spaces removed."""
    rows = [[str(cell) for cell in row] for row in rows]
    head = [] if header is None else [[str(h) for h in header]]
    table = head + rows
    if not table:
        return []
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(max(len(r) for r in table))]
    right = set(right)

    def line(cells):
        text = "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return (indent + text).rstrip()

    lines = [line(r) for r in head]
    if head and rule:
        lines.append(indent + "  ".join("-" * w for w in widths))
    return lines + [line(r) for r in rows]


def format_bytes(n: float) -> str:
    """``"224 GiB"``, ``"1.5 MiB"``, ``"512 bytes"``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def count(n: int, noun: str) -> str:
    """``"1 batch"``, ``"3 batches"``, ``"0 samples"``."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "sh", "ch", "x")) else f"{n} {noun}s"
