"""The retrieval tools' error: a mistake the user can fix (exit 2, no traceback)."""

from __future__ import annotations

from ..errors import UserError


class RetrieveError(UserError):
    """Bad input to the retrieval tools; the message says what and how to fix it."""
