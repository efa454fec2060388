"""Errors that the command-line tools turn into one line and exit code 2."""

from __future__ import annotations

import argparse


class EclipError(Exception):
    """A user-facing error: printed as one line, exit code 2, no traceback."""


def first_line(e: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or the name
    of its type when the message is empty (``MemoryError()``), for one-line reports."""
    lines = str(e).splitlines()
    return (lines[0] if lines and lines[0] else type(e).__name__)[:limit]


def printable(text: str) -> str:
    """``text`` with every character that is not printable (a newline, a NUL, a lone
    surrogate) written as its escape (``\\n``, ``\\x00``, ``\\ud83d``): a file name or a
    caption quoted in an error must keep the error on one line."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for ch in text)


class DataError(EclipError):
    """Bad input data, located by file and (when known) line or row.

    ``where`` is ``"FILE"`` or ``"FILE:LINE"``; ``problem`` says what is wrong in a few words.
    The message is one line whatever the two hold (``printable``); ``to_json`` keeps them as
    they are.
    """

    def __init__(self, where: str, problem: str):
        self.where = where
        self.problem = problem
        super().__init__(f"{printable(where)}: {printable(problem)}")

    def to_json(self) -> dict:
        return {"where": self.where, "problem": self.problem}


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where there is none to show (None):
    those options say in their own help what they fall back to, and "(default: None)" would
    contradict it."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (``prog: error: message``), exit code 2, like
    every other bad input of the command-line tools; ``--help`` still prints the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def seed_value(text: str) -> int:
    """argparse type of a ``--seed``: an int in [-2⁶³, 2⁶⁴), the range torch's generators
    take (one outside failed inside the run, with a traceback)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value}: expected an int in [-2**63, 2**64)")
    return value
