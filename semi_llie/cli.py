"""`semi-llie` command line: one entry point, subcommands implemented next to their code.

Each command module exposes `add_arguments(parser)` and `main(args) -> int`. Modules are imported only
when their command runs (or for `--help` of that command), so `semi-llie --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from semi_llie import __version__
from semi_llie.engine.allocator import keep_freed_memory
from semi_llie.errors import UserError

# (command words, implementing module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("shards", "build"), "semi_llie.data.build_cli", "pack image folders into WebDataset shards"),
    (("shards", "verify"), "semi_llie.data.verify_cli", "re-read shards and check them against the manifest"),
    (("shards", "merge"), "semi_llie.data.merge_cli", "join the manifests of parts built with --part I/N"),
    (
        ("train",),
        "semi_llie.train",
        "train the Semi-LLIE mean teacher (plain, accelerate launch, torchrun, srun)",
    ),
    (
        ("evaluate",),
        "semi_llie.evaluate",
        "score a checkpoint or registered model on paired or unpaired data",
    ),
    (("enhance",), "semi_llie.enhance", "enhance image files, folders or globs with a trained model"),
    (
        ("sweep",),
        "semi_llie.sweep",
        "train a grid of config overrides x seeds as child runs of one MLflow run (here or as a SLURM array)",
    ),
    (("runs", "compare"), "semi_llie.compare", "compare MLflow runs: table (markdown, CSV) and metric plot"),
    (
        ("quickstart",),
        "semi_llie.quickstart",
        "the whole job on a tiny synthetic dataset, on CPU, in minutes",
    ),
]


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semi-llie", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"semi-llie {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module, help_text in COMMANDS:
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(
                    dest="subcommand", metavar="SUBCOMMAND", required=True
                )
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        sub.set_defaults(_module=module)
        # Only the command being run needs its arguments: import its module for that one alone.
        if _selects(argv, words):
            importlib.import_module(module).add_arguments(sub)
    return parser


def _selects(argv: list[str], words: tuple[str, ...]) -> bool:
    positional = [a for a in argv if not a.startswith("-")]
    return tuple(positional[: len(words)]) == words


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except UserError as err:
        print(f"semi-llie: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("semi-llie: interrupted", file=sys.stderr)
        return 130
