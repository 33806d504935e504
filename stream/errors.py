"""Errors a user can cause. The CLI prints their message on one line and exits with status 2; anything else is a bug."""

from __future__ import annotations


class TalkstreamError(Exception):
    """Base of every error caused by the user's input or settings."""


class PresetError(TalkstreamError, ValueError):
    """An unknown preset, section or key, or a value of the wrong type or out of range."""


class InputError(TalkstreamError, ValueError):
    """An input file that cannot be used (not an image, corrupt audio, ...)."""


class OutputError(TalkstreamError, OSError):
    """An output that cannot be written."""


def first_line(error: BaseException) -> str:
    """An error in one line (its message's first, else its type's name): for messages that quote another's."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
