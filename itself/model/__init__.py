"""The ITSELF model: backbone with attention capture, GRAB heads, MARS selection, ATS schedule.

`ITSELF` is loaded on first use, with torch: `itself.model.ats` (the ATS schedule, which Tune's
driver reads) imports without torch."""


def __getattr__(name: str):
    if name == "ITSELF":
        from .itself import ITSELF

        return ITSELF
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
