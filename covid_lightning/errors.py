"""The one base class for mistakes a user can fix (a path, a missing file, a wrong checkpoint).

The CLI prints such an error as one paragraph and exits non-zero, without a traceback
(``--debug`` or ``COVID_LIGHTNING_DEBUG=1`` shows it).
"""

from __future__ import annotations


class UserError(Exception):
    """Raised for bad input or configuration; the message names the thing and the fix."""
