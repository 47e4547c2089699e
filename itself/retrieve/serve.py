"""The search page: `python -m itself.retrieve serve --index DIR [--host 127.0.0.1] [--port 8000]`.

    GET /                         a text box; with ?q=TEXT[&k=N] the ranked thumbnails below it
    GET /api/search?q=TEXT[&k=N]  the same results as JSON
    GET /thumb/ROW.png            gallery image ROW with the patches MARS kept (rendered once, cached)

The standard library's ThreadingHTTPServer, bound to 127.0.0.1 unless told otherwise: there is no
authentication, and whoever reaches the port sees the gallery. Queries longer than
`max_query_chars` are refused (400). Everything that comes from the user or the gallery (the
query, names, identities) is made printable and escaped into the page, which shows the query, the
result count and the time taken, never a server path. A connection that sends nothing for
`idle_timeout_s` is closed, and at most `max_connections` are served at once (more get 503 at
once): a client cannot hold the server's threads. A thumbnail is the image that was indexed or
nothing: one whose bytes changed since is refused (410), one that cannot be read is 404.
"""

from __future__ import annotations

import errno
import html
import io
import json
import re
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from ..panels import overlay
from ..safeio import UnsafePath
from .errors import RetrieveError
from .gallery import GalleryChanged
from .report import PAGE_STYLE, hit_figure, page
from .search import Index
from .vectors import DEFAULT_CANDIDATES, DEFAULT_EF_SEARCH

MAX_QUERY_CHARS = 300  # CLIP's text tower reads 77 tokens (~300 characters); longer is refused
MAX_TOP_K = 100
THUMBNAILS_CACHED = 1024
IDLE_TIMEOUT_S = 30.0  # a connection silent this long is closed
MAX_CONNECTIONS = 64  # connections served at once; more are answered 503 and closed
SECURITY_HEADERS = {
    # Only this server's own script, images and forms; inline styles only (no inline script).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; img-src 'self'; style-src 'unsafe-inline'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
THUMB_PATH = re.compile(r"/thumb/(\d{1,12})\.png")


class BadRequest(ValueError):
    """A query the page refuses (400), with a message for the user."""


class SearchApp:
    """What the handler serves: search results, the page around them, thumbnails."""

    def __init__(self, index: Index, top_k: int = 10, max_query_chars: int = MAX_QUERY_CHARS,
                 ef_search: int = DEFAULT_EF_SEARCH, candidates: int = DEFAULT_CANDIDATES):
        self.index, self.top_k, self.max_query_chars = index, top_k, max_query_chars
        self.ef_search, self.candidates = ef_search, candidates
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    def parse(self, params: dict) -> tuple[str, int]:
        """(query, k) from the URL's parameters; BadRequest when out of bounds."""
        query = params.get("q", [""])[0].strip()
        if len(query) > self.max_query_chars:
            raise BadRequest(f"the query is {len(query)} characters long; at most {self.max_query_chars} are read")
        k = params.get("k", [str(self.top_k)])[0]
        if not k.isdigit() or not 1 <= int(k) <= MAX_TOP_K:
            raise BadRequest(f"k must be a whole number from 1 to {MAX_TOP_K}")
        return query, int(k)

    def search(self, query: str, k: int) -> list[dict]:
        if not query:
            return []
        return self.index.search([query], k, self.ef_search, self.candidates)[0]

    def page(self, query: str = "", k: int | None = None, error: str = "") -> str:
        k = k or self.top_k
        results, took = [], 0.0
        if query and not error:
            start = time.perf_counter()
            results = self.search(query, k)
            took = time.perf_counter() - start
        info = self.index.info
        body = [f"<h1>Person search</h1><p>{info['images']} images. Highlighted patches: the tokens MARS kept "
                "for GRAB.</p>",
                '<form method="get" action="/"><input id="q" name="q" type="search" size="70" autofocus '
                f'maxlength="{self.max_query_chars}" placeholder="describe the person" value="{html.escape(query)}"> '
                f'<label>top <input id="k" name="k" type="number" min="1" max="{MAX_TOP_K}" value="{k}"></label> '
                '<button type="submit">Search</button></form>']
        if error:
            body.append(f'<p id="error" class="error">{html.escape(error)}</p>')
        elif query:
            body.append(f'<p id="summary">{len(results)} results for <span class="q">{html.escape(query)}</span> '
                        f'({took * 1000:.0f} ms)</p><div class="row">'
                        + "".join(hit_figure(h, f"/thumb/{h['row']}.png") for h in results) + "</div>")
        style = PAGE_STYLE + " .error{color:#d22} #q{font-size:15px;padding:4px}"
        return page("ITSELF person search", style, body)

    def thumbnail(self, row: int) -> bytes:
        """PNG of gallery image `row` with the patches MARS kept (KeyError: no such row;
        GalleryChanged: its bytes are not the indexed ones; RetrieveError, OSError: unreadable)."""
        if not 0 <= row < len(self.index):
            raise KeyError(row)
        with self._thumbs_lock:
            if row in self._thumbs:
                self._thumbs.move_to_end(row)
                return self._thumbs[row]
        data = self.index.image(row)
        with self.index.model_lock:
            image = overlay(self.index.model, data, tuple(self.index.cfg.data.image_size))
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        with self._thumbs_lock:
            self._thumbs[row] = buf.getvalue()
            while len(self._thumbs) > THUMBNAILS_CACHED:
                self._thumbs.popitem(last=False)
        return buf.getvalue()


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine only: localhost, 127.0.0.0/8, ::1."""
    import ipaddress

    if host.rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def host_name(header: str | None) -> str:
    """The host of a Host header (`name:port`, `[v6]:port`), lower case; "" when there is none."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Handler(BaseHTTPRequestHandler):
    server_version = "itself-search"
    protocol_version = "HTTP/1.1"  # keep-alive: a page's thumbnails come over one connection
    app: SearchApp  # set by make_server
    loopback_only: bool  # set by make_server: bound to this machine only

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        if self.loopback_only and not is_loopback(host_name(self.headers.get("Host"))):
            # DNS rebinding: a web page whose name now resolves to 127.0.0.1 would read the gallery
            # through the user's browser; only requests for this machine's own names are answered.
            self._send(403, "text/plain; charset=utf-8", b"this server answers requests for localhost only")
            return
        url = urlsplit(self.path)
        params = parse_qs(url.query)
        try:
            if url.path == "/":
                try:
                    self._send(200, "text/html; charset=utf-8", self.app.page(*self.app.parse(params)).encode())
                except BadRequest as e:
                    query = params.get("q", [""])[0][: self.app.max_query_chars]
                    self._send(400, "text/html; charset=utf-8", self.app.page(query, error=str(e)).encode())
            elif url.path == "/api/search":
                try:
                    query, k = self.app.parse(params)
                    hits = [{key: h[key] for key in ("rank", "score", "row", "name", "pid")}  # (no server paths)
                            | {"thumbnail": f"/thumb/{h['row']}.png"} for h in self.app.search(query, k)]
                    body = {"query": query, "results": hits}
                    self._send(200, "application/json", json.dumps(body).encode())
                except BadRequest as e:
                    self._send(400, "application/json", json.dumps({"error": str(e)}).encode())
            elif (m := THUMB_PATH.fullmatch(url.path)):
                self._send(200, "image/png", self.app.thumbnail(int(m.group(1))), cache=True)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found")
        except KeyError:
            self._send(404, "text/plain; charset=utf-8", b"no such image")
        except GalleryChanged as e:
            self.log_error("refused %s: %s", self.path, e)
            self._send(410, "text/plain; charset=utf-8", b"this image changed since it was indexed; rebuild the index")
        except (RetrieveError, UnsafePath, OSError) as e:
            self.log_error("unreadable %s: %s", self.path, e)
            self._send(404, "text/plain; charset=utf-8", b"this image cannot be read")
        except Exception as e:  # noqa: BLE001 - the server keeps serving; the log says what failed
            self.log_error("failed %s: %s: %s", self.path, type(e).__name__, e)
            self._send(500, "text/plain; charset=utf-8", b"internal error (see the server's log)")

    def _send(self, status: int, content_type: str, body: bytes, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the http.server signature
        # Control characters of a request line are escaped (a query cannot write to the terminal).
        line = (format % args).encode("unicode_escape").decode("ascii")
        sys.stderr.write(f"[{self.log_date_time_string()}] {line}\n")


class BoundedServer(ThreadingHTTPServer):
    """ThreadingHTTPServer serving at most `max_connections` connections at once (one thread
    each); a connection beyond is answered 503 and closed at once."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS):
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 8\r\nConnection: close\r\n"
                                b"Retry-After: 1\r\n\r\ntoo busy")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def make_server(app: SearchApp, host: str = "127.0.0.1", port: int = 8000, idle_timeout_s: float = IDLE_TIMEOUT_S,
                max_connections: int = MAX_CONNECTIONS) -> ThreadingHTTPServer:
    """The server, bound (RetrieveError, one line, when the port is taken or the host cannot be bound)."""
    handler = type("BoundHandler", (Handler,), {"app": app, "timeout": idle_timeout_s, "loopback_only": is_loopback(host)})
    try:
        return BoundedServer((host, port), handler, max_connections)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise RetrieveError(f"cannot serve on {host}: port {port} is in use (by another program); choose another "
                                "--port (0: any free port)") from None
        if e.errno == errno.EACCES:
            raise RetrieveError(f"cannot serve on {host}: port {port} needs privileges; choose a --port above 1023") from None
        raise RetrieveError(f"cannot serve on --host {host} --port {port}: {e.strerror or e}; choose another --host "
                            "(127.0.0.1: this machine only)") from None


def search_url(host: str, port: int, query: str = "") -> str:
    return f"http://{host}:{port}/" + (f"?{urlencode({'q': query})}" if query else "")


def serve(app: SearchApp, host: str, port: int, idle_timeout_s: float = IDLE_TIMEOUT_S,
          max_connections: int = MAX_CONNECTIONS) -> None:
    server = make_server(app, host, port, idle_timeout_s, max_connections)
    if not is_loopback(host):
        print(f"warning: serving on {host}: no authentication, anyone who reaches port {server.server_port} "
              "can search and see the gallery", file=sys.stderr)
    print(f"serving {app.index.info['images']} images at {search_url(host, server.server_port)} (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
