"""The one error type streamlens raises for bad input or an unsupported model.

Messages repeat the user's own input ("layer 14 is out of range for a 12-layer model"), so the
first line of the traceback says what to fix.
"""

from __future__ import annotations


class StreamlensError(ValueError):
    """Bad input (empty prompt, unknown layer, multi-token target, ...) or an unsupported model."""


class UnsupportedModelError(StreamlensError):
    """The model breaks an assumption streamlens relies on (named in the message)."""
