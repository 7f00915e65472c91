"""The `alphaset` command line: a thin layer over library functions.

Each command group lives beside the code it drives and contributes a ``register(subparsers)``
function listed in COMMAND_MODULES. Errors that users can fix (wrong path, bad flag value,
missing model) are printed as one line and exit with status 2, never as a traceback. A failed
write (disk full, I/O error) stops the command cleanly: it prints what was done, then one line,
and exits with status 1. Anything else — a plain ValueError from a library included — is a bug
and keeps its traceback. ``-v`` works anywhere on the command line.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from pipeline import __version__
from pipeline.errors import UserError

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
    "pipeline.app.cli",
    "pipeline.demo",
]


__all__ = ["UserError", "main", "user_error_types"]

# OSErrors that name a path the user gave wrong (exit 2); other OSErrors are failed writes or
# reads of a healthy path — disk full, I/O error — (exit 1).
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM}


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types printed as one line instead of a traceback."""
    from pipeline.fs import StorageError, UnreadableFile
    from pipeline.ingest.folder import SourceError
    from pipeline.store import StoreError

    types: list[type[BaseException]] = [
        UserError,
        StoreError,
        StorageError,
        SourceError,
        UnreadableFile,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        FileExistsError,
        PermissionError,
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


def positive_int(text: str) -> int:
    """argparse type: an integer > 0 (rejected at parse time, before anything runs)."""
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    value = _number(text, float)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename and e.strerror:
        text = f"{e.filename}: {e.strerror}"  # FileNotFoundError(2, 'No such file') → the path
    return text.splitlines()[0] if text else type(e).__name__


def _exit_now_if_ray_connect_hung(code: int) -> None:
    """A timed-out Ray connection still runs in a thread that would hold the exit and print
    Ray's warnings; leave at once (everything written so far is flushed)."""
    cluster = sys.modules.get("pipeline.cluster")
    if cluster is not None and cluster.connect_hung.is_set():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``-v``/``--verbose`` anywhere before ``--`` (``alphaset caption … -v`` works too)."""
    out, verbose = [], False
    for i, a in enumerate(argv):
        if a == "--":
            out.extend(argv[i:])
            break
        if a in ("-v", "--verbose"):
            verbose = True
        else:
            out.append(a)
    return out, verbose


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, verbose = _split_verbose(list(sys.argv[1:] if argv is None else argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag (2) or --help (0): the message is printed already
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    args.verbose = verbose or args.verbose
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from pipeline import fs

    try:
        try:
            if args.storage_options is not None:
                os.environ[fs.STORAGE_OPTIONS_ENV] = args.storage_options  # workers inherit it
                fs.storage_options()  # a bad value fails here, before any work
            return int(args.func(args) or 0)
        except Exception as e:  # object-store credentials/endpoint failures: one line too
            err = fs.storage_error(e)
            if err is None or err is e:
                raise
            raise err from e
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
    except BrokenPipeError:
        # `alphaset manifest show | head -3`: the reader has what it wanted; stay silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except user_error_types() as e:
        if args.verbose:
            raise
        print(f"alphaset {args.command}: error: {_one_line(e)}", file=sys.stderr)
        _exit_now_if_ray_connect_hung(2)
        return 2
    except OSError as e:
        if args.verbose:
            raise
        summary = getattr(e, "summary", None) or getattr(e.__context__, "summary", None)
        if summary is not None:
            print("\n".join(summary.lines()))
        print(f"alphaset {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2 if e.errno in _PATH_ERRNOS else 1
    except KeyboardInterrupt:
        print(
            "interrupted; completed shards are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
