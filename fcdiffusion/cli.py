"""The command-line skeleton every top-level script shares: arguments, YAML config with `key.sub=value` overrides,
logging, and the mapping of known errors to a one-line message and exit status 1.

A script builds its parser with `parser(__doc__)`, writes `run(args, overrides) -> int` with library calls that
raise, and ends with `sys.exit(main(argv))` where `main = lambda argv=None: cli.main(build_parser(), run, argv)`.
Library code never prints errors or returns exit codes: it raises, and only `main` turns that into a status.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from omegaconf import DictConfig

from ldm.checkpoint import CheckpointMismatchError
from ldm.util import load_config


class UsageError(ValueError):
    """A command line that cannot work, found before any model is built or file written."""


# What a script reports as `error: <message>` with exit status 1 instead of a traceback.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, CheckpointMismatchError,
                                                 PermissionError, IsADirectoryError, NotADirectoryError)


def parser(description: str | None) -> argparse.ArgumentParser:
    """An argument parser that shows the script's docstring (examples included) as its `--help` text."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def config_with_overrides(path: str, overrides: Sequence[str]) -> DictConfig:
    """The YAML config at `path` with `key.sub=value` overrides applied (anything else is a UsageError)."""
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        raise UsageError(f"unrecognised arguments {bad} (overrides are key.sub=value)")
    return load_config(path, list(overrides))


def main(arguments: argparse.ArgumentParser, run: Callable[[argparse.Namespace, list[str]], int | None],
         argv: Sequence[str] | None = None, overrides: bool = False) -> int:
    """Parse `argv`, set up logging and call `run(args, overrides)`; its return value is the exit status (None: 0).

    With `overrides`, arguments the parser does not know are passed on as config overrides; without, they are an
    argparse error (status 2). A known error (`KNOWN_ERRORS`) becomes `error: <message>` and status 1.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if overrides:
        args, rest = arguments.parse_known_args(argv)
    else:
        args, rest = arguments.parse_args(argv), []
    try:
        status = run(args, rest)
    except KNOWN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0 if status is None else int(status)
