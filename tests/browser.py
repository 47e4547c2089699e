"""Headless Chromium for the page tests: the flags, and a small DevTools-protocol driver (type into
a page, press keys, read the DOM, take screenshots) over websocket-client."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from itself.dist import free_port
from runs import wait_until

HEADLESS_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    """Chromium's path; the test is skipped where it is not installed (failed in CI)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium missing in CI (.ci/run installs it)")
        pytest.skip("chromium not installed here; .ci/run installs it")
    return browser


# What the page's images came to, once loaded (the pages themselves show no such counters).
IMAGE_CHECK_JS = ("(() => { const imgs = [...document.images]; const broken = imgs.filter(i => !(i.complete && "
                  "i.naturalWidth > 0)); return `images: ${imgs.length} loaded: ${imgs.length - broken.length} "
                  "broken: ${broken.length}`; })()")


class DevTools:
    """`with DevTools(tmp_path) as page:` a headless Chromium page driven over the DevTools protocol."""

    def __init__(self, workdir: Path, width: int = 1280, height: int = 1400):
        try:
            import websocket
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail("websocket-client missing in CI (pip install -e '.[dev]')")
            pytest.skip("websocket-client not installed (pip install -e '.[dev]')")
        browser = chromium_or_skip()
        self.port = free_port()
        self.log = open(workdir / "chromium.log", "wb")
        self.proc = subprocess.Popen([browser, *HEADLESS_FLAGS, f"--user-data-dir={workdir / 'profile'}",
                                      f"--remote-debugging-port={self.port}", f"--window-size={width},{height}",
                                      "about:blank"], stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._page_target() is not None, 60, "Chromium's DevTools endpoint")
            # (Chromium refuses DevTools websockets that send an Origin it does not allow: send none.)
            self.ws = websocket.create_connection(self._page_target(), suppress_origin=True, timeout=60)
        except BaseException:
            self._stop()
            raise
        self._id = 0

    def _page_target(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
        except OSError:
            return None
        return pages[0]["webSocketDebuggerUrl"] if pages else None

    def send(self, method: str, **params) -> dict:
        """Call a DevTools method; its result (events arriving meanwhile are dropped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait_loaded(url)

    def wait_loaded(self, url_prefix: str = "") -> None:
        wait_until(lambda: self.evaluate(f"document.readyState === 'complete' && "
                                         f"location.href.startsWith({json.dumps(url_prefix)})"), 120, "the page to load")

    def image_check(self) -> str:
        """`images: N loaded: L broken: B` of the page, once every image finished loading or failing."""
        wait_until(lambda: self.evaluate("[...document.images].every(i => i.complete)"), 120, "the page's images")
        return self.evaluate(IMAGE_CHECK_JS)

    def type_text(self, selector: str, text: str) -> None:
        """Focus an element and type into it as a user would (insertText: one input event per call)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self):
        """The viewport as a PIL image."""
        from PIL import Image

        data = self.send("Page.captureScreenshot", format="png")["data"]
        return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self._stop()

    def _stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
