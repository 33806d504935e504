"""Argument types and the parser shared by the command line and the server: each type turns a bad value into a usage
error (one line, exit 2) before any work starts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user error: one `talkstream: error:` line and exit 2, not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"talkstream: error: {message} (see `{self.prog} --help`)\n")


def positive(kind: type) -> Callable[[str], Any]:
    """Numbers above zero (argparse turns the ValueError into a usage error)."""
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def sizes(text: str) -> list[int]:
    """A comma-separated list of positive integers."""
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) <= 0:
        raise ValueError(text)
    return values


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return value


def existing_dir(text: str) -> Path:
    """A folder that exists: a mistyped --checkpoints is an error, never an empty folder checked quietly."""
    path = Path(text).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder" if path.exists() else f"{text} does not exist")
    return path
