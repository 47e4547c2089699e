"""Shared helpers of the benchmarks: peak-memory sampling and timing."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """`with PeakRSS() as m: ...` -> m.extra: the peak resident memory above the level at entry (bytes),
    sampled every millisecond (catches temporaries that plain before/after readings miss)."""

    def _read(self) -> int:
        return self._proc.memory_info().rss

    def __enter__(self):
        self._proc = psutil.Process()
        self.start = self.peak = self._read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())
        self.extra = self.peak - self.start


class PeakAnon(PeakRSS):
    """PeakRSS counting anonymous memory only (RssAnon): memory-mapped files read through the page
    cache, which the kernel drops under pressure, are not counted."""

    def _read(self) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return self._proc.memory_info().rss


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
