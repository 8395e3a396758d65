"""Command-line helpers shared by every blockdpr and bench CLI.

List flags accept both spellings, ``--blocks 16,32`` and ``--blocks 16 32`` (or a mix), through
:func:`add_list_argument`; help texts show each default once (:class:`HelpFormatter`); and
error text printed through rich is escaped (:func:`escape`), so ``[n, 3072]`` or a path holding
``[/x]`` is shown as written. :class:`ArgumentParser` reports a bad command line in two lines (the
error and where to find the flags) instead of argparse's usage block.
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Callable, Sequence

from rich.markup import escape as _rich_escape

__all__ = ["ArgumentParser", "HelpFormatter", "RawHelpFormatter", "add_list_argument", "split_list", "escape"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once per flag, and nothing for flags without a meaningful default.

    A help text that already says its default (contains ``default``) is left as it is; switches
    (``store_true`` / ``store_false``) and ``None`` defaults get no suffix.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text
        return super()._get_help_string(action)

    def _expand_help(self, action: argparse.Action) -> str:
        """A list default is written as it is typed (``60,120,160``), not as a Python list."""
        if isinstance(action.default, (list, tuple)):
            action = copy.copy(action)
            action.default = ",".join(map(str, action.default))
        return super()._expand_help(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose parse errors are one ``error: ...`` line and a pointer to ``--help``
    (exit 2), not the 16-33 lines of usage above the one line that matters."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n(see {self.prog} --help)\n")


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` that keeps the description's line breaks (a module docstring as written)."""


def split_list(tokens: str | Sequence[str], value_type: Callable[[str], Any] = str, name: str = "value") -> list:
    """``"1,2 3"`` or ``["1,2", "3"]`` -> ``[value_type("1"), ...]``; empty items are ignored.

    Raises ``argparse.ArgumentTypeError`` naming the bad item.
    """
    if isinstance(tokens, str):
        tokens = [tokens]
    items = [item.strip() for token in tokens for item in str(token).replace(",", " ").split()]
    values = []
    for item in items:
        try:
            values.append(value_type(item))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise argparse.ArgumentTypeError(f"{name}: {item!r} is not a valid {getattr(value_type, '__name__', 'value')}"
                                             + (f" ({e})" if str(e) else "")) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{name}: expected at least one value")
    return values


class _ListAction(argparse.Action):
    def __init__(self, *args, item_type: Callable[[str], Any] = str, item_choices: Sequence | None = None, **kwargs):
        self.item_type, self.item_choices = item_type, item_choices
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            items = split_list(values, self.item_type, option_string or self.dest)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
        if self.item_choices is not None:
            bad = [v for v in items if v not in self.item_choices]
            if bad:
                parser.error(f"{option_string}: {bad} not in {list(self.item_choices)}")
        setattr(namespace, self.dest, items)


def add_list_argument(parser: argparse.ArgumentParser | Any, *flags: str, type: Callable[[str], Any] = str,
                      choices: Sequence | None = None, **kwargs) -> argparse.Action:
    """``parser.add_argument`` for a list flag taking ``A,B``, ``A B`` or both; items parsed by ``type``.

    ``choices`` restricts the items (not the raw tokens). Other keyword arguments go to
    ``add_argument`` unchanged (``default``, ``help``, ``metavar``, ``dest``...).
    """
    kwargs.setdefault("metavar", "X,X")
    return parser.add_argument(*flags, nargs="+", action=_ListAction, item_type=type, item_choices=choices, **kwargs)


def escape(text: object) -> str:
    """``str(text)`` with rich markup escaped, for messages printed through a rich Console."""
    return _rich_escape(str(text))
