"""Argument types and the option helper of the ``seqppl`` command line (``seqppl.cli``).

Each type raises ``argparse.ArgumentTypeError``, which argparse turns into one usage line and
exit status 2; ``add_option`` states every option's default in its help.
"""

from __future__ import annotations

import argparse

__all__ = ["nonnegative_int", "positive_int", "positive_float", "unit_interval", "add_option"]


def nonnegative_int(text: str) -> int:
    """``text`` as an integer >= 0 (``argparse.ArgumentTypeError`` otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    """``text`` as an integer >= 1."""
    value = nonnegative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected an integer >= 1, got 0")
    return value


def positive_float(text: str) -> float:
    """``text`` as a number > 0 (NaN refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """``text`` as a number in (0, 1)."""
    value = positive_float(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def add_option(parser, *flags, help: str, **kwargs) -> None:
    """``parser.add_argument`` with ``(default: ...)`` appended to ``help`` (flags aside)."""
    default = kwargs.get("default")
    if default is not None and kwargs.get("action") != "store_true":
        help = f"{help} (default: {default})"
    parser.add_argument(*flags, help=help, **kwargs)
