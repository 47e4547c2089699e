"""Annotation files of millions of records, read as a stream: memory follows one record, not the file.

- `iter_json_array(path)`: the elements of a file holding one JSON list (`[{...}, {...}]`), decoded
  one by one with `json.JSONDecoder.raw_decode` over a sliding window of the text. A syntax error
  or a truncated file stops the read with `ValueError` naming the element and byte; a list cannot
  be resynchronised after a syntax error, so it is the whole file's problem, not one record's.
- `iter_json_object(path)`: the (key, value) members of a file holding one JSON object
  (`{"Part1/7/1.jpg": [...], ...}`), read the same way.
- Each takes `root`: a file found under it is checked as opened (`shards.inputs.open_input`).
- `iter_jsonl(path)`: the lines of a JSONL file, split on b"\\n" only. Python's `str.splitlines`
  also splits on U+2028, U+2029, U+0085 and \\x1c-\\x1e, characters a caption may hold inside a
  JSON string: one record would become two malformed ones.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Iterator

from .inputs import open_input

READ_CHARS = 1 << 20
"""Text decoded per read."""
MAX_RECORD_CHARS = 64 << 20
"""Largest single element accepted (a person record is hundreds of characters; an unterminated
string would otherwise pull the rest of the file into memory)."""
_SPACE = " \t\n\r"


class _Text:
    """A UTF-8 file decoded into a window of text, with the position of the window in the file."""

    def __init__(self, f):
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof, self.dropped = "", 0, False, 0

    def more(self) -> bool:
        """Read more text; False at the end of the file."""
        if self.eof:
            return False
        data = self.f.read(READ_CHARS)
        self.eof = not data
        try:
            text = self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 text near character {self.dropped + len(self.buf)}: {e.reason}") from None
        if self.pos > len(self.buf) // 2:  # forget what was consumed
            self.dropped += self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        self.buf += text
        return bool(text) or not self.eof

    def skip_space(self) -> str:
        """The next non-space character ('' at the end), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _SPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def where(self) -> str:
        return f"character {self.dropped + self.pos}"


def iter_json_array(path: str | Path, root=None) -> Iterator:
    """Each element of the JSON list in `path`, in order. ValueError (with the element's number and
    position) when the file is not one well-formed JSON list."""
    decoder = json.JSONDecoder()
    with open_input(path, "the annotation file", root=root) as f:
        text = _Text(f)
        yield from _members(text, "list", lambda n: _element(decoder, text, n, "list"))


def iter_json_object(path: str | Path, root=None) -> Iterator[tuple[str, object]]:
    """Each (key, value) of the JSON object in `path`, in order (a key given twice comes twice).
    ValueError (with the member's number and position) when the file is not one well-formed JSON
    object."""
    decoder = json.JSONDecoder()
    with open_input(path, "the annotation file", root=root) as f:
        text = _Text(f)
        yield from _members(text, "object", lambda n: _member(decoder, text, n))


def first_character(path: str | Path, root=None) -> str:
    """The first character of a JSON file after any BOM and white space ('' for an empty file): '['
    for a list, '{' for an object."""
    with open_input(path, "the annotation file", root=root) as f:
        return _Text(f).skip_space()


_BRACKETS = {"list": "[]", "object": "{}"}


def _members(text: _Text, kind: str, read) -> Iterator:
    """`read(n)` for each member of the list or object (`kind`) the text holds, checking the
    brackets and commas around them and that nothing follows."""
    opener, closer = _BRACKETS[kind]
    first = text.skip_space()
    if first != opener:
        what = "an empty file" if first == "" else f"{first!r} where a JSON {kind} starts with {opener!r}"
        raise ValueError(f"expected a JSON {kind} of records, found {what}")
    text.pos += 1
    n = 0
    if text.skip_space() == closer:
        text.pos += 1
    else:
        while True:
            yield read(n)
            n += 1
            c = text.skip_space()
            if c == ",":
                text.pos += 1
                continue
            if c == closer:
                text.pos += 1
                break
            found = "the end of the file (truncated?)" if c == "" else repr(c)
            raise ValueError(f"after element {n - 1} at {text.where()}: expected ',' or {closer!r}, found {found}")
    if text.skip_space() != "":
        raise ValueError(f"text after the end of the {kind} at {text.where()}")


def _member(decoder: json.JSONDecoder, text: _Text, n: int) -> tuple[str, object]:
    """The (key, value) of an object's member starting at the window's position."""
    key = _element(decoder, text, n, "object")
    if not isinstance(key, str):
        raise ValueError(f"element {n} at {text.where()}: an object's key must be a string (not a well-formed JSON "
                         "object)")
    if text.skip_space() != ":":
        raise ValueError(f"element {n} at {text.where()}: expected ':' after the key (not a well-formed JSON object)")
    text.pos += 1
    return key, _element(decoder, text, n, "object")


def _element(decoder: json.JSONDecoder, text: _Text, n: int, kind: str):
    """Decode the element starting at the window's position. A value that ends exactly at the end of
    the window may continue in the next read (a number), so it is decoded again with more text."""
    if text.skip_space() == "":
        raise ValueError(f"the file ends inside the {kind}, before element {n} (truncated?)")
    while True:
        try:
            value, end = decoder.raw_decode(text.buf, text.pos)
        except RecursionError:
            raise ValueError(f"element {n} at {text.where()}: nested too deeply") from None
        except json.JSONDecodeError as e:
            if text.eof or len(text.buf) - text.pos > MAX_RECORD_CHARS:
                what = ("larger than the largest record accepted" if not text.eof else f"{e.msg}")
                raise ValueError(f"element {n} at {text.where()}: {what} (not a well-formed JSON {kind})") from None
            text.more()
            continue
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise ValueError(f"element {n} at {text.where()}: {str(e)[:200]}") from None
        if end < len(text.buf) or text.eof:
            text.pos = end
            return value
        text.more()


def iter_jsonl(path: str | Path, root=None) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of every non-blank line, split on b"\\n" only; a line that is not
    UTF-8 comes back with its undecodable bytes escaped (the caller rejects it as not JSON)."""
    with open_input(path, "the annotation file", root=root) as f:
        for n, raw in enumerate(iter(lambda: f.readline(MAX_RECORD_CHARS + 1), b""), 1):
            if len(raw) > MAX_RECORD_CHARS:  # (no line ends within it: a record is hundreds of bytes)
                raise ValueError(f"line {n} is longer than the largest record accepted ({MAX_RECORD_CHARS} bytes)")
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            if raw.strip():
                yield n, raw.decode("utf-8", errors="surrogateescape")


def parse_line(text: str, where: str):
    """A JSONL line's value; ValueError naming `where` when it is not JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: {e}") from None
    except ValueError as e:
        raise ValueError(f"{where}: {str(e)[:200]}") from None
