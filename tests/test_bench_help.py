"""The --help of every bench CLI and of reproduce: every flag explained, defaults as they are typed."""

import argparse
import importlib
import re
import sys

import pytest

from blockdpr import reproduce

REPO = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
MODULES = ["bench.aot", "bench.breakdown", "bench.memory", "bench.readme", "bench.session", "bench.throughput",
           "bench.train_speed"]


class Captured(Exception):
    pass


def captured_parser(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a bench module's main() builds (stopped at parse_args)."""
    seen = []

    def parse(self, *args, **kwargs):
        seen.append(self)
        raise Captured

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)
    mod = importlib.import_module(module)
    with pytest.raises(Captured):
        (getattr(mod, "build_parser", None) or mod.main)().parse_args([]) if hasattr(mod, "build_parser") else mod.main([])
    return seen[0]


def problems(parser: argparse.ArgumentParser) -> list[str]:
    found = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        flag = action.option_strings[0]
        if not action.help:
            found.append(f"{flag}: no help")
    text = parser.format_help()
    for pattern, what in ((r"\[['\d(]", "a Python repr"), (re.escape(REPO), "a machine path"),
                          (r"\(default [^:]|; default ", "a default not written '(default: X)'")):
        for line in text.splitlines():
            if re.search(pattern, line) and not line.lstrip().startswith(("usage", "[")) and "[-" not in line \
                    and not re.search(r"[A-Z],[A-Z] \[", line):
                found.append(f"{what}: {line.strip()}")
    return found


@pytest.mark.parametrize("module", MODULES)
def test_bench_help_explains_every_flag(module, monkeypatch):
    assert problems(captured_parser(module, monkeypatch)) == []


def test_reproduce_help_explains_every_flag():
    assert problems(reproduce.build_parser()) == []


def test_reproduce_errors_are_one_line_and_a_pointer_to_help(capsys):
    with pytest.raises(SystemExit) as e:
        reproduce.parse_args(["--trials", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: --trials must be >= 1\n"
                   "(see python -m blockdpr.reproduce --help)\n"), "not the 30 lines of usage"
