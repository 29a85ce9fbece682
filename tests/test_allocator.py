"""The CLI keeps freed tensor memory in the process (glibc mallopt) unless opted out."""

from __future__ import annotations

import ctypes
import sys

import pytest

from semi_llie.engine import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_keep_freed_memory_applies_on_glibc_and_can_be_opted_out(monkeypatch):
    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("not glibc")
    assert allocator.keep_freed_memory() is True
    monkeypatch.setenv(allocator.OPT_OUT_ENV, "0")
    assert allocator.keep_freed_memory() is False


def test_cli_applies_it_before_running_a_command(monkeypatch):
    from semi_llie import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    with pytest.raises(SystemExit):
        cli.main(["quickstart", "--help"])
    assert calls == []  # --help exits while parsing, before anything runs
    monkeypatch.setattr(cli, "build_parser", lambda argv: _parser_running(calls))
    assert cli.main(["noop"]) == 0
    assert calls == [True, "ran"]


def _parser_running(calls):
    import argparse
    import types

    module = types.ModuleType("noop_command")
    module.main = lambda args: calls.append("ran") or 0
    sys.modules["noop_command"] = module
    parser = argparse.ArgumentParser()
    parser.add_argument("command")
    parser.set_defaults(_module="noop_command", verbose=False)
    return parser
