"""The event cap: an event whose payload would be too large has its longest text fields cut, before it is signed.

An agent decides what it prints, so the daemon cannot let a 9 MB message become a 9 MB event: the server would
refuse it (its max_payload, 1 MiB by default) and every reader of the job would carry it. `cap_event` is called
once, by the event store, on each payload before it is sealed. A payload whose JSON fits `limit` bytes is
returned as it is. Otherwise the longest strings in it (at any depth: `text`, `reasons[3]`,
`plan.tasks[0].instructions`) are cut to a common length chosen so the whole fits, each ending with CUT_MARK,
and the payload's `truncated` lists each cut field with its size in UTF-8 bytes and its SHA-256 before the cut.
The whole text stays where it came from: the agent's run log (whose hash `TaskExited` records), the request.

Cutting is linear in the payload's size: one walk to measure, a search over the lengths, one walk to cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import msgspec

from numerusd.protocol.events import EventData, Truncated

#: Default cap on an event's payload, in bytes of JSON: well below a NATS server's default max_payload (1 MiB).
DEFAULT_MAX_EVENT_BYTES = 256 * 1024
#: Appended to a cut string, so a reader of the text sees that it goes on elsewhere (an event's `truncated`
#: says where it was cut and what it was).
CUT_MARK = " [numerus: truncated]"
#: Most strings `shrink` looks at: a value holding more is a long list (a reply to page), left as it is.
MAX_TEXTS = 10_000
#: Room for one `truncated` record (field path, size, hash) and the mark, in bytes of JSON.
_RECORD_ROOM = 200

_encode = msgspec.json.encode
_Data = TypeVar("_Data", bound=EventData)
_Value = TypeVar("_Value", bound=msgspec.Struct)


def cap_event(data: _Data, limit: int) -> _Data:
    """`data` if its JSON fits `limit` bytes; else a copy with its longest strings cut to fit and recorded."""
    capped, cuts = shrink(data, limit)
    if not cuts:
        return data
    return msgspec.structs.replace(capped, truncated=(*(data.truncated or ()), *cuts))


def shrink(value: _Value, limit: int) -> tuple[_Value, list[Truncated]]:
    """`value` (a msgspec Struct) with its longest strings cut so its JSON fits `limit` bytes, and what was cut.

    Best effort: a value made of many short strings (or of no strings) may still not fit; the caller checks.
    """
    size = len(_encode(value))
    if size <= limit:
        return value, []
    texts: dict[str, int] = {}
    try:
        _map_text(value, "", lambda path, text: _measure(texts, path, text))
    except _TooMany:
        return value, []  # a long list, not a long text: the caller pages it or refuses it
    lengths = sorted(texts.values(), reverse=True)
    if sum(n - _RECORD_ROOM for n in lengths if n > _RECORD_ROOM) < size - limit:
        return value, []  # cutting every string to nothing would not do: not worth a pass
    keep = _common_length(lengths, size - limit)
    while True:
        cuts: list[Truncated] = []
        capped = _map_text(value, "", partial(_cut, cuts, keep=keep))
        # The search works on estimates (the mark and the records vary a little): check, and cut deeper if need be.
        over = len(_encode(capped)) + len(_encode(cuts)) - limit
        if over <= 0 or keep == 0:
            return capped, cuts
        keep = max(0, keep - over - 64)


class _TooMany(Exception):
    """More than MAX_TEXTS strings: cutting them would take long and save little."""


def _measure(texts: dict[str, int], path: str, text: str) -> str:
    if len(texts) == MAX_TEXTS:
        raise _TooMany
    texts[path] = len(_encode(text))
    return text


def _common_length(lengths: list[int], excess: int) -> int:
    """The largest length L such that cutting every string longer than L to L saves `excess` bytes and the room
    for its record. `lengths` is sorted longest first."""
    low, high = 0, lengths[0] if lengths else 0
    while low < high:
        mid = (low + high + 1) // 2
        saved = sum(n - mid - _RECORD_ROOM for n in lengths if n > mid + _RECORD_ROOM)
        if saved >= excess:
            low = mid
        else:
            high = mid - 1
    return low


def cut_text(text: str, chars: int) -> str:
    """`text` if it has at most `chars` characters, else its first `chars` and CUT_MARK."""
    return text if len(text) <= chars else text[:chars] + CUT_MARK


def _cut(cuts: list[Truncated], path: str, text: str, *, keep: int) -> str:
    encoded = _encode(text)
    if len(encoded) <= keep + _RECORD_ROOM:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    cuts.append(Truncated(field=path, size=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    # `keep` counts JSON bytes; escapes make some characters longer, so shorten until the prefix fits.
    prefix = text[:keep]
    while prefix and len(_encode(prefix)) > keep:
        prefix = prefix[: len(prefix) * keep // len(_encode(prefix)) - 1]
    return prefix + CUT_MARK


def _map_text(value: Any, path: str, change: Callable[[str, str], str]) -> Any:
    """`value` with every string in it (struct fields, tuple and list items, dict values) passed through
    `change(path, text)`; unchanged parts are the same objects."""
    if isinstance(value, str):
        return change(path, value)
    if isinstance(value, msgspec.Struct):
        changed = {}
        for name in value.__struct_fields__:  # not msgspec.structs.fields: it evaluates annotations, slowly
            if name == "truncated":
                continue
            old = getattr(value, name)
            new = _map_text(old, f"{path}.{name}" if path else name, change)
            if new is not old:
                changed[name] = new
        return msgspec.structs.replace(value, **changed) if changed else value
    if isinstance(value, tuple | list):
        items = [_map_text(item, f"{path}[{i}]", change) for i, item in enumerate(value)]
        if all(new is old for new, old in zip(items, value, strict=True)):
            return value
        return type(value)(items)
    if isinstance(value, dict):
        entries = {key: _map_text(item, f"{path}.{key}", change) for key, item in value.items()}
        return value if all(entries[key] is value[key] for key in value) else entries
    return value
