"""The one base class of errors a user can fix: bad input, a mismatched checkpoint, missing data.

The command line prints a ``CommerError`` in one line and lets anything else (a bug) show its traceback; the service
maps its subclasses to 4xx responses. Each subclass lives next to the code that raises it.
"""

from __future__ import annotations


class CommerError(Exception):
    """Something the caller can fix; the message names the problem and, where there is one, the fix."""


class ConfigError(CommerError, ValueError):
    """A configuration key or value that is not allowed; the message names the key and the value."""
