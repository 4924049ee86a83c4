"""The one base class for mistakes a user can fix; the CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Raised for bad input or configuration; the message names the thing and the fix."""
