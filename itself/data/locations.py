"""Where built datasets live: a local folder or a URL that fsspec opens (`https://`, `s3://`,
`gs://`, ...). Paths and URLs joined, opened, checked; whole files or byte ranges read (a server
that ignores Range requests is read whole, once); `pipe:` commands refused unless asked for."""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path

from ..errors import DataError, UserError
from ..safeio import open_regular, read_regular


def is_url(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    """A path under `root`, local or URL."""
    return "/".join([str(root).rstrip("/"), *parts]) if is_url(root) else str(Path(root, *parts))


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"cannot open {url}: {e} (install the fsspec backend of that scheme, e.g. s3fs, gcsfs, "
                        "aiohttp for https)") from None


def _open(path: str, mode: str = "rb"):
    """A file of a dataset, local or a URL. A local one must be a regular file (through links or
    not): a FIFO or device in a shard's or manifest's place is refused without blocking on it."""
    if not is_url(path):
        return os.fdopen(open_regular(path, "dataset file", 1 << 62, follow=True), mode)
    fs, p = _fs(path)
    return fs.open(p, mode)


def local_file(path: str) -> str:
    """`path`, once checked to be a regular file, through links or not (a FIFO or device is refused
    without blocking on it): for readers that open it themselves (pyarrow)."""
    _open(path).close()
    return path


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    try:
        return fs.exists(p)
    except Exception as e:  # noqa: BLE001 - a server error, no route
        raise DataError(f"cannot reach {path}: {type(e).__name__}: {e}") from None


MAX_JSON_BYTES = 64 << 20
"""The largest JSON file read from a dataset (dataset.json: a few KiB per thousand shards)."""


def read_json(path: str, what: str = "data.root") -> dict:
    """A dataset's JSON file: a bounded regular file (a FIFO or device in its place, through a link
    or not, or a file beyond MAX_JSON_BYTES, is refused without reading it), or at most that much
    from a URL."""
    try:
        if is_url(path):
            with _open(path) as f:
                data = f.read(MAX_JSON_BYTES + 1)
            if len(data) > MAX_JSON_BYTES:
                raise DataError(f"cannot read {path}: more than the {MAX_JSON_BYTES} bytes accepted")
        else:
            data = read_regular(path, what, MAX_JSON_BYTES, follow=True)
        return json.loads(data)
    except (OSError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise DataError(f"cannot read {path}: {e}") from None


@functools.lru_cache(maxsize=64)
def serves_ranges(url: str) -> bool:
    """Whether the server of an http(s) URL answers byte-range requests (object stores and most web
    servers do; `python -m http.server` does not). Other URLs and local files: True. Asked once per
    server; without ranges, manifests are read whole and shards streamed."""
    if not str(url).startswith(("http://", "https://")):
        return True
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status == 206
    except (urllib.error.URLError, OSError, ValueError):
        return True  # (unknown: fsspec's own error will say what is wrong)


def _server(url: str) -> str:
    """The scheme and host of a URL: range support is a property of the server."""
    scheme, _, rest = str(url).partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/"


def ranged(url: str) -> bool:
    return serves_ranges(_server(url)) if is_url(url) else True


def read_whole(url: str) -> bytes:
    """A whole file (one plain GET for a URL)."""
    if not is_url(url):
        with _open(url) as f:
            return f.read()
    fs, p = _fs(url)
    return fs.cat_file(p)


def open_random_access(path: str):
    """A file to seek in (Parquet): the file or URL itself, or its bytes in memory where the server
    answers no ranges (the manifest is then streamed once)."""
    return _open(path) if ranged(path) else io.BytesIO(read_whole(path))


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (a ranged request for URLs; the whole file read and cut where the
    server answers no ranges)."""
    try:
        if not ranged(url):
            data = read_whole(url)[start:end]
        else:
            with _open(url) as f:
                f.seek(start)
                data = f.read(end - start)
    except Exception as e:  # noqa: BLE001 - IO errors of any kind
        raise DataError(f"cannot read shard {url}: {type(e).__name__}: {e}") from None
    if len(data) != end - start:
        raise DataError(f"cannot read shard {url}: it ends before byte {end} (truncated, or from another build); "
                        "rebuild the dataset")
    return data


def is_command(url: str) -> bool:
    """A `pipe:CMD` shard URL: webdataset runs CMD through a shell to read it."""
    return str(url).startswith("pipe:")


def open_stream(url: str, commands: bool = False):
    """A whole shard as a byte stream: local files and fsspec URLs; `pipe:` commands through
    webdataset only with `commands` (shard URLs the user typed, `data.train_shards`), never for
    a URL read from a file (an index, a dataset.json): data is never run."""
    if is_command(url):
        if not commands:
            raise DataError(f"shard {url[:200]!r}: a command (pipe:), refused: commands are run only when "
                            "typed as data.train_shards, never when read from a file")
        from webdataset.gopen import gopen

        return gopen(url)
    return _open(url)
