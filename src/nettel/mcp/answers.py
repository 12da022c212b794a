"""What an agent can afford: compact numbers and JSON, pages with a cursor, one-line errors.

Every answer is shaped here before it leaves the server: numbers compacted (whole
numbers as integers, the rest to 4 significant digits), JSON without spaces, lists cut
into pages whose ``next`` cursor fetches the rest, and at most :data:`BUDGET_CHARS`
characters in all. Errors are one line of at most :data:`ERROR_CHARS` characters that
say what was wrong and what would be valid, quoting at most :data:`QUOTE_CHARS` of the
caller's input.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from nettel.errors import NettelError

T = TypeVar("T")

#: Characters an answer may take (about 2k tokens).
BUDGET_CHARS = 8_000
#: Characters an error may take.
ERROR_CHARS = 300
#: Characters of the caller's input an error may quote.
QUOTE_CHARS = 60
SIGNIFICANT_DIGITS = 4


class ToolInputError(NettelError, ValueError):
    """A tool argument nettel cannot answer; the message says what would be valid."""


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of the caller's ``value``, cut to ``limit`` characters.

    Examples
    --------
    >>> quoted("web")
    "'web'"
    >>> quoted("x" * 500)
    "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'…(500 chars)"
    """
    text = str(value)
    if len(text) <= limit - 2:
        return repr(text)
    return f"{text[: limit - 2]!r}…({len(text)} chars)"


def compact_number(value: float) -> float | int:
    """A whole number as ``int``, anything else to 4 significant digits.

    Examples
    --------
    >>> compact_number(58931.0), compact_number(237623.88332016865), compact_number(0.0123456)
    (58931, 237600, 0.01235)
    >>> compact_number(float("nan")) is None
    False
    """
    if not math.isfinite(value):
        return value
    if value == int(value) and abs(value) < 2**53:
        return int(value)
    digits = SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, digits)
    if rounded == int(rounded) and abs(rounded) < 2**53:
        return int(rounded)
    return rounded


def compact(doc: Any) -> Any:
    """``doc`` with every float compacted (see :func:`compact_number`); ints stay exact.

    Examples
    --------
    >>> compact({"bytes": 1200.0, "rate": [1 / 3, None], "n": 7})
    {'bytes': 1200, 'rate': [0.3333, None], 'n': 7}
    """
    if isinstance(doc, bool) or doc is None or isinstance(doc, int | str):
        return doc
    if isinstance(doc, float):
        return compact_number(doc)
    if isinstance(doc, dict):
        return {k: compact(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [compact(v) for v in doc]
    return doc


def to_text(doc: Any) -> str:
    """Compact JSON (no spaces, non-ASCII kept).

    Examples
    --------
    >>> to_text({"a": [1, 2], "b": "é"})
    '{"a":[1,2],"b":"é"}'
    """
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=str)  # fmt: skip


def fit(doc: dict[str, Any], budget: int = BUDGET_CHARS) -> dict[str, Any]:
    """``doc`` cut to ``budget`` characters of compact JSON, as a last resort.

    Tools page their lists themselves; this only catches an answer that still runs
    over: items are dropped from the end of its longest list, and ``truncated`` says
    how many.

    Examples
    --------
    >>> doc = fit({"items": list(range(3000))}, budget=200)
    >>> len(to_text(doc)) <= 200, doc["truncated"]
    (True, 'items: 2964 of 3000 left out to fit the answer budget; ask for fewer (limit)')
    """
    if len(to_text(doc)) <= budget:
        return doc
    lists = [k for k, v in doc.items() if isinstance(v, list) and v]
    if not lists:
        return doc
    key = max(lists, key=lambda k: len(to_text(doc[k])))
    items = list(doc[key])
    total = len(items)
    out = dict(doc)
    lo, hi = 0, total  # the most items that fit: binary search on the count kept
    while lo < hi:
        mid = (lo + hi + 1) // 2
        out[key] = items[:mid]
        out["truncated"] = _cut_hint(key, total - mid, total)
        if len(to_text(out)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    out[key] = items[:lo]
    out["truncated"] = _cut_hint(key, total - lo, total)
    return out


def _cut_hint(key: str, left: int, total: int) -> str:
    return f"{key}: {left} of {total} left out to fit the answer budget; ask for fewer (limit)"


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a ranked list: its items, how many there are in all, the next cursor."""

    items: list[T]
    offset: int
    total: int
    next_cursor: str | None

    def hint(self, order: str) -> str | None:
        """One line saying what was left out and how to get it (None: nothing was)."""
        if self.next_cursor is None:
            return None
        shown = f"{self.offset + 1}-{self.offset + len(self.items)}"
        return (f"showing {shown} of {self.total} ({order}); for more pass "
                f"cursor={self.next_cursor!r}")  # fmt: skip


def cursor_for(tool: str, offset: int) -> str:
    """An opaque cursor for ``tool``'s list from ``offset`` on.

    Examples
    --------
    >>> cursor_for("list_containers", 20)
    'bGlzdF9jb250YWluZXJzOjIw'
    >>> offset_of("list_containers", cursor_for("list_containers", 20))
    20
    """
    return base64.urlsafe_b64encode(f"{tool}:{offset}".encode()).decode().rstrip("=")


def offset_of(tool: str, cursor: str | None) -> int:
    """Where ``cursor`` (from :func:`cursor_for`) starts; 0 for none.

    Examples
    --------
    >>> offset_of("list_containers", "nope")
    Traceback (most recent call last):
    ...
    nettel.mcp.answers.ToolInputError: cursor 'nope' is not one list_containers gave: \
pass the "next" value of its last answer, or omit it for the first page
    """
    if cursor is None or not cursor.strip():
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor.strip() + "=" * (-len(cursor.strip()) % 4))
        name, _, offset = raw.decode().rpartition(":")
        if name == tool and offset.isdigit():
            return int(offset)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise ToolInputError(
        f'cursor {quoted(cursor)} is not one {tool} gave: pass the "next" value of its '
        "last answer, or omit it for the first page"
    )


def page(tool: str, items: Sequence[T], cursor: str | None, limit: int, *,
         size: Callable[[T], int] | None = None,
         budget: int = BUDGET_CHARS * 3 // 4) -> Page[T]:  # fmt: skip
    """The page of ``items`` (ranked, best first) that ``cursor`` designates: at most
    ``limit`` items, fewer if their ``size`` would run past ``budget`` characters.

    Examples
    --------
    >>> p = page("t", list("abcdefg"), None, 3)
    >>> p.items, p.total, p.hint("alphabetical")
    (['a', 'b', 'c'], 7, "showing 1-3 of 7 (alphabetical); for more pass cursor='dDoz'")
    >>> page("t", list("abcdefg"), "dDoz", 3).items
    ['d', 'e', 'f']
    >>> page("t", list("abcdefg"), None, 5, size=lambda _: 40, budget=100).items
    ['a', 'b']
    """
    offset = offset_of(tool, cursor)
    taken: list[T] = []
    used = 0
    for item in items[offset : offset + limit]:
        cost = 0 if size is None else size(item) + 1
        if taken and used + cost > budget:
            break
        taken.append(item)
        used += cost
    end = offset + len(taken)
    return Page(taken, offset, len(items), cursor_for(tool, end) if end < len(items) else None)


_PYDANTIC_ERRORS: dict[str, str] = {
    "missing": "is required",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
}


def one_line_error(tool: str, message: str, validation: list[dict[str, Any]] | None = None,
                   limit: int = ERROR_CHARS) -> str:  # fmt: skip
    """A tool's error as one line of at most ``limit`` characters.

    ``validation``: pydantic's errors for bad arguments, turned into "argument: what is
    valid" without the internal model name, its documentation URL or the input.

    Examples
    --------
    >>> one_line_error("get_network_stats", "", [{"type": "literal_error", "loc": ("timeframe",),
    ...     "msg": "Input should be 'hour', 'day', 'week' or 'month'", "input": "year"}])
    "Error executing tool get_network_stats: timeframe: Input should be 'hour', 'day', \
'week' or 'month'"
    >>> len(one_line_error("t", "x\\n" * 400))
    300
    """
    if validation is not None:
        parts = []
        for err in validation:
            where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
            what = _PYDANTIC_ERRORS.get(str(err.get("type")), str(err.get("msg", "is not valid")))
            if err.get("type") == "unexpected_keyword_argument":
                what = "is not an argument of this tool"
            parts.append(f"{quoted(where, 40) if len(where) > 38 else where}: {what}")
        message = f"Error executing tool {tool}: " + "; ".join(parts)
    text = re.sub(r"\s+", " ", message).strip()
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text
