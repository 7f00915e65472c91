"""The `alphaset` command line: a thin layer over library functions.

Each command group lives beside the code it drives and contributes a ``register(subparsers)``
function listed in COMMAND_MODULES. Errors that users can fix (wrong path, bad flag value,
missing model) are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline import __version__

# Module → register(subparsers). Order is the order in `alphaset --help`.
COMMAND_MODULES = [
    "pipeline.ingest.cli",
    "sam_data.cli",
    "captioning.cli",
    "curation.cli",
    "pipeline.manifest_cli",
    "training.features_cli",
    "training.cli",
    "training.sample_cli",
    "training.finetune_cli",
    "pipeline.demo",
]


class UserError(Exception):
    """An error the user can fix; the CLI prints it as one line."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types printed as one line instead of a traceback."""
    from pipeline.fs import StorageError
    from pipeline.ingest.folder import SourceError
    from pipeline.store import StoreError

    types: list[type[BaseException]] = [
        UserError,
        StoreError,
        StorageError,
        SourceError,
        FileNotFoundError,
        ValueError,
    ]
    try:
        from pipeline.models import ModelNotFoundError

        types.append(ModelNotFoundError)
    except ImportError:
        pass
    return tuple(types)


class _Parser(argparse.ArgumentParser):
    """argparse that prints one usage line plus the error, not the whole usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="alphaset",
        description="Data engine for PixArt-alpha-style text-to-image training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"alphaset {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue  # command group not built in this checkout
            raise
        module.register(sub)
    _add_storage_options(parser)
    return parser


def _add_storage_options(parser: argparse.ArgumentParser, top: bool = True) -> None:
    """``--storage-options JSON`` on the top level and on every command that takes ``--store``
    (so it can stand next to the store URL); `main` exports it for subprocesses and workers."""
    help_text = (
        "JSON object of fsspec options for an object store, e.g. "
        '\'{"endpoint_url": "http://127.0.0.1:9000", "anon": false}\' or \'{"profile": "lab"}\' '
        "(default: $ALPHASET_STORAGE_OPTIONS)"
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_storage_options(child, top=False)
    if top:
        parser.add_argument("--storage-options", default=None, metavar="JSON", help=help_text)
    elif any("--store" in a.option_strings for a in parser._actions):
        parser.add_argument(
            "--storage-options", default=argparse.SUPPRESS, metavar="JSON", help=help_text
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from pipeline import fs

    try:
        if args.storage_options is not None:
            os.environ[fs.STORAGE_OPTIONS_ENV] = args.storage_options  # workers inherit it
            fs.storage_options()  # a bad value fails here, before any work
        return int(args.func(args) or 0)
    except Exception as e:
        err = e if isinstance(e, user_error_types()) else fs.storage_error(e)
        if err is None or args.verbose:
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"alphaset {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted; completed shards are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
