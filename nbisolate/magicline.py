"""The options at the start of a magic's line, read as IPython reads them.

IPython's magics take getopt-style short options (``Magics.parse_options``):
``%timeit -n1 -r1 stmt``, ``%timeit -n 1 -r 1 stmt`` and ``%timeit -qo stmt`` mean the
same, and the first word that is not an option starts the code. Two sides read the
same line: the kernel's plan, for the names the code reads and binds, and the worker,
which runs it. Both read it here, so they cannot disagree on where the code begins.
Standard library only: the worker imports it.
"""

from __future__ import annotations

import re

__all__ = ["PRUN", "TIMEIT", "UsageError", "split_options"]

TIMEIT = "n:r:tcp:qov:"
"""``%timeit``'s options as IPython declares them (``-v NAME`` is IPython 9's)."""

PRUN = "D:l:rs:T:q"
"""``%prun``'s options as IPython declares them."""

_WORD = re.compile(r"(\S+)\s*")


class UsageError(ValueError):
    """A magic's line names an option the magic does not take, or leaves one without its value.

    Named as IPython's own, which an ordinary cell shows for the same line."""


def split_options(line: str, spec: str) -> tuple[dict[str, str], str]:
    """``({letter: value}, the rest of the line as written)`` for getopt's ``spec``.

    A letter followed by ``:`` in ``spec`` takes a value, attached (``-n1``) or as the
    next word (``-n 1``); the others are flags (value ``""``) and may be grouped
    (``-qo``). Options end at the first word not starting with ``-``, or at ``--``.
    Raises :class:`UsageError` as IPython raises ``UsageError``.
    """
    takes = {c for i, c in enumerate(spec) if c != ":" and spec[i + 1 : i + 2] == ":"}
    known = set(spec) - {":"}
    options: dict[str, str] = {}
    rest = line.lstrip()
    while rest.startswith("-") and len(rest) > 1 and not rest[1].isspace():
        word = _WORD.match(rest)
        assert word is not None
        letters, rest = word.group(1)[1:], rest[word.end() :]
        if letters == "-":
            break
        for i, letter in enumerate(letters):
            if letter not in known:
                raise UsageError(f'option -{letter} not recognized (allowed: "{spec}")')
            if letter not in takes:
                options[letter] = ""
                continue
            value = letters[i + 1 :]
            if not value:
                following = _WORD.match(rest)
                if following is None:
                    raise UsageError(f'option -{letter} requires argument (allowed: "{spec}")')
                value, rest = following.group(1), rest[following.end() :]
            options[letter] = value
            break
    return options, rest
