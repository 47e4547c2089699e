"""Checks of a record's fields before anything is trusted: types, sizes, text, image paths.

Shared by the converters (on every annotation record, before its image is read) and the writer
(on every record it is given), so a record is judged the same way whoever made it. Each check
returns None when the value is fine, else `(reason, detail)`: the reason is one of the fixed
strings of `rejects.jsonl` (`REASONS`), the detail says what was found, with values shown by
`bounded` (never more than a few hundred characters, however large or deep the value).
"""

from __future__ import annotations

import os
import re
import reprlib

from .schema import SPLITS

MAX_PID_CHARS = 256
"""Longest person id (as text) accepted."""
MAX_CAPTION_CHARS = 10_000
"""Longest caption accepted (CLIP reads 77 tokens; a caption this long is a mistake)."""
MAX_CAPTIONS = 1_000
"""Most captions one image may have."""
MAX_PATH_CHARS = 4_096
"""Longest image path accepted."""

# Every reason a record can be rejected for (the `reason` field of rejects.jsonl).
REASONS = (
    "malformed record", "unknown split", "record without id", "empty or non-string caption",
    "caption too long", "missing image file", "not a regular file", "image file too large",
    "path escapes the root", "duplicate image entry", "identity in two splits",
    "unreadable or truncated image", "unsupported image format",
    "identity not contiguous",  # corpora with real identities (shards.chunking)
)

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6
_REPR.maxlevel = 3


def bounded(value) -> str:
    """A repr of `value` of bounded length (long strings, big or deep containers shortened)."""
    try:
        return _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
        return f"<{kind(value)}>"


# Control characters, line and paragraph separators, and the marks that reorder a line on screen.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, limit: int = 1000) -> str:
    """A name from a foreign folder as a page or a terminal may show it: bytes that were not UTF-8
    (lone surrogates, as Python reads such file names) become U+FFFD, control characters `\\xNN`
    (line separators and the marks that reorder a line `\\uNNNN`), and at most `limit` characters are kept. (HTML escaping is the page's.)"""
    text = text if isinstance(text, str) else str(text)
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # (a surrogate that is no escaped byte, e.g. from JSON's "\\ud800")
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def kind(value) -> str:
    """The JSON name of a value's type, as messages say it (`got list`, `got object`, ...)."""
    names = {dict: "object", list: "list", str: "string", bool: "bool", int: "integer", float: "float",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _bad_text(text: str) -> str | None:
    """What makes `text` unusable as text (None if nothing): lone surrogates cannot be written."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    return None


def _check_text(what: str, value, text: str, limit: int, too_long: str) -> tuple[str, str] | None:
    """(reason, detail) when `text` (of the record's `what`, `value`) is longer than `limit`
    characters (reason `too_long`) or is not text a caption or an id may hold."""
    if len(text) > limit:
        return too_long, f"{what} is {len(text)} characters long (at most {limit}): {bounded(value)}"
    if (why := _bad_text(text)) is not None:
        return "malformed record", f"{what} {why}: {bounded(value)}"
    return None


def check_split(split) -> tuple[str, str] | None:
    if split is None:
        return "unknown split", f"no split given; expected one of {', '.join(SPLITS)}"
    if not isinstance(split, str):
        return "malformed record", f"split must be a string, got {kind(split)}: {bounded(split)}"
    if split not in SPLITS:
        return "unknown split", f"{bounded(split)} is not one of {', '.join(SPLITS)}"
    return None


def check_pid(pid) -> tuple[str, str] | None:
    if pid is None or (isinstance(pid, str) and not pid.strip()):
        return "record without id", f"id {bounded(pid)}"
    if isinstance(pid, bool) or not isinstance(pid, (int, str)):
        return "malformed record", f"pid must be an integer or a string, got {kind(pid)}: {bounded(pid)}"
    try:
        text = str(pid)
    except ValueError:  # an integer too long to print
        return "malformed record", f"pid is longer than {MAX_PID_CHARS} characters"
    return _check_text("pid", pid, text, MAX_PID_CHARS, "malformed record")


def pid_key(pid) -> str:
    """An identity as the builder compares and records it (`orig_pid`): its text, so the ids
    7 and "7" are one identity."""
    return str(pid)


def check_captions(captions) -> tuple[str, str] | None:
    """None if `captions` is a string or a non-empty list of non-empty strings (each at most
    MAX_CAPTION_CHARS, at most MAX_CAPTIONS of them), else (reason, detail)."""
    if isinstance(captions, str):
        captions = [captions]
    if captions is None or (isinstance(captions, list) and not captions):
        return "empty or non-string caption", "no captions"
    if not isinstance(captions, list):
        return "malformed record", (f"captions must be a list of strings or a string, got {kind(captions)}: "
                                    f"{bounded(captions)}")
    if len(captions) > MAX_CAPTIONS:
        return "malformed record", f"{len(captions)} captions (at most {MAX_CAPTIONS} per image)"
    for c in captions:
        if not isinstance(c, str):
            return "empty or non-string caption", f"non-string caption ({kind(c)}): {bounded(c)}"
        if not c.strip():
            return "empty or non-string caption", f"empty caption: {bounded(c)}"
        if (problem := _check_text("caption", c, c, MAX_CAPTION_CHARS, "caption too long")) is not None:
            return problem
    return None


def check_fields(split, pid, captions) -> tuple[str, str] | None:
    """The first problem of a record's split, id and captions, or None."""
    return check_split(split) or check_pid(pid) or check_captions(captions)


def normalise_path(rel) -> tuple[str | None, tuple[str, str] | None]:
    """(normalised path, None) for an image path relative to the image root, or (None, problem).

    `./a//b/../c.jpg` becomes `a/c.jpg` (`os.path.normpath`): two spellings of one file are one
    path for the duplicate check. Absolute paths and paths that leave the root (`..`) are refused
    here, without touching the file system; links are the caller's to check."""
    if rel is None or rel == "":
        return None, ("missing image file", "no image path")
    if not isinstance(rel, str):
        return None, ("malformed record", f"image path must be a string, got {kind(rel)}: {bounded(rel)}")
    if "\x00" in rel:
        return None, ("malformed record", f"image path contains a NUL byte: {bounded(rel)}")
    if len(rel) > MAX_PATH_CHARS:
        return None, ("malformed record", f"image path is {len(rel)} characters long (at most {MAX_PATH_CHARS})")
    if (why := _bad_text(rel)) is not None:
        return None, ("malformed record", f"image path {why}: {bounded(rel)}")
    if os.path.isabs(rel):
        return None, ("path escapes the root", f"absolute path: {bounded(rel)}")
    norm = os.path.normpath(rel)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return None, ("path escapes the root", f"path escapes the root: {bounded(rel)}")
    if norm == os.curdir:
        return None, ("missing image file", f"no image path: {bounded(rel)}")
    return norm, None
