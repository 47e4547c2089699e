"""The ITSELF model: backbone with attention capture, GRAB heads, MARS selection, ATS schedule."""

from .itself import ITSELF  # noqa: F401
