"""Comma-separated command-line values shared by the `kvpilot sim` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection


def floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated numbers") from None


def ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated integers") from None


def names_from(known: Collection[str]) -> Callable[[str], list[str]]:
    """A parser for a comma-separated subset of `known` (policy names)."""

    def parse(s: str) -> list[str]:
        names = [x.strip() for x in s.split(",") if x.strip()]
        bad = [n for n in names if n not in known]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown policy {bad[0]!r}; expected some of {list(known)}"
            )
        return names

    return parse
