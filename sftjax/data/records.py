"""Reading JSON data files record by record: JSON Lines or one JSON array, each value with the line it starts on.

Every failure is one `DataError` line naming `file:line`: a missing file, bytes that are not UTF-8, invalid JSON
(including what Python's reader gives up on: nesting deeper than its recursion limit, an integer of more than 4300
digits), a malformed array. What the records mean is `formats.py`'s job.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftjax.data.errors import DataError


def _decode(raw: bytes, path: Path, line_offset: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1 + line_offset
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None


def _unreadable(error: Exception) -> str:
    """Why Python's JSON reader gave up on valid-looking JSON: nesting deeper than its recursion limit, or an integer
    longer than Python converts (4300 digits)."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return f"a number too large ({str(error).split(':')[0]})"


def _jsonl_records(raw: bytes, path: Path):
    """(line number, decoded JSON value) for each non-blank line."""
    for number, line in enumerate(raw.split(b"\n"), start=1):
        text = _decode(line, path, number - 1)
        if number == 1:
            text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: invalid JSON: {e.msg} (column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise DataError(f"{path}:{number}: invalid JSON: {_unreadable(e)}") from None
        yield number, value


def _json_array_records(text: str, path: Path):
    """(line number where the element starts, value) for each element of a top-level JSON array."""
    decoder = json.JSONDecoder()

    def skip(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i, what):
        line = text.count("\n", 0, i) + 1
        raise DataError(f"{path}:{line}: invalid JSON: {what}")

    start = 1 if text.startswith("\ufeff") else 0  # a UTF-8 byte-order mark
    i = skip(skip(start) + 1)  # past '['
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            fail(e.pos, e.msg)
        except (RecursionError, ValueError) as e:
            fail(i, _unreadable(e))
        yield text.count("\n", 0, i) + 1, value
        i = skip(end)
        if i >= len(text):
            fail(i, "unterminated array")
        if text[i] == "]":
            if skip(i + 1) != len(text):
                fail(skip(i + 1), "extra data after the array")
            return
        if text[i] != ",":
            fail(i, "expected ',' or ']'")
        i = skip(i + 1)


def read_records(path: str | Path):
    """Yield (line number, decoded JSON value) from a JSONL file or a JSON array file. Raises DataError.

    A `.jsonl` file is always JSON Lines; any other file holding a top-level '[' is one JSON array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    raw = path.read_bytes()
    head = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if path.suffix != ".jsonl" and head == b"[":
        yield from _json_array_records(_decode(raw, path), path)
    else:
        yield from _jsonl_records(raw, path)
