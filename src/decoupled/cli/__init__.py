"""The `decoupled` command: one module per subcommand, each with `add_parser` and `run`.

Exit statuses: 0 done; 1 some runs failed (named in a warning line); 2 bad arguments, or an
``--out`` whose results.db is not a usable store (one line on stderr,
`decoupled suggest: error: ...`); 3 the disk failed under the output folder (full, or an I/O
error): one line, and the runs finished so far are kept in results.db, so the same command
resumes once space is freed; 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import math
import re
import sys
import warnings

from decoupled import __version__

# subcommand -> module in this package; imported when used so that `decoupled --help`
# and `decoupled suggest` do not load the lab's heavier dependencies.
SUBCOMMANDS = {
    "bench": "Measure optimizer step throughput against torch.optim.",
    "compare": "Train Adam vs AdamW (or SGD vs SGDW) over seeds and report the difference.",
    "inspect": "Measure what weight decay does per layer (Adam + L2 vs AdamW) against theory.",
    "report": "Rebuild the reports from the results store, without training.",
    "sweep": "Sweep lr × weight decay per optimizer; heatmaps and separability.",
    "suggest": "Suggest a weight decay λ for each rule and convention.",
}


class CommandError(Exception):
    """A bad value found after parsing: reported like an argparse error (status 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2, and a negative
    number in e-notation (``--lr -1e-3``) is read as a value, so that its check names it;
    argparse before Python 3.13 took it for an option and said "expected one argument"."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


#: Integers above this (seeds, counts, steps) are typos, not plans: torch's seeds are 64-bit.
MAX_INT = 2**63 - 1


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a valid {kind.__name__}: {text!r}") from None
    if kind is int and abs(value) > MAX_INT:
        raise argparse.ArgumentTypeError(f"must be at most 2**63 - 1, got {text}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="decoupled",
        description="Adam (L2) vs AdamW (decoupled weight decay): optimizers, diagnostics, lab.",
    )
    parser.add_argument("--version", action="version", version=f"decoupled {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=OneLineParser
    )
    for name, summary in SUBCOMMANDS.items():
        module = importlib.import_module(f"decoupled.cli.{name}")
        sub = subparsers.add_parser(name, help=summary, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run, parser=sub)
    return parser


#: The exit status when the disk fails under the output folder; finished runs are kept.
EXIT_STORAGE = 3
#: OSError numbers that mean the disk, not the arguments, failed: full, over quota, I/O.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def storage_failure(error: BaseException) -> bool:
    """Whether ``error`` is the disk failing (exit status 3) rather than a bad argument."""
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS


def _storage_message(error: BaseException, out: str | None) -> str:
    if not isinstance(error, OSError):  # StoreUnavailable: its message says it all
        return str(error)
    written = error.filename or out  # matplotlib's failed write does not name its file
    where = f" (writing into {written})" if written else ""
    kept = f" in {out}/results.db" if out else ""
    return (
        f"{error.strerror or error}{where}; the runs finished so far are kept{kept}: free "
        "space and run the command again (finished runs are not redone), or rebuild the "
        "reports alone with `decoupled report`"
    )


def _run(args: argparse.Namespace) -> int:
    from decoupled.lab.store_schema import StoreUnavailable, StoreWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, StoreWarning):  # one line, like the other warnings
            print(f"decoupled {args.command}: warning: {message}", file=sys.stderr)
        else:
            default_show(message, category, filename, lineno, file, line)

    default_show = warnings.showwarning
    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return args.run(args)
        except (StoreUnavailable, OSError) as error:
            if not (isinstance(error, StoreUnavailable) or storage_failure(error)):
                raise
            message = _storage_message(error, getattr(args, "out", None))
            print(f"decoupled {args.command}: error: {message}", file=sys.stderr)
            return EXIT_STORAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return _run(args)
    except CommandError as error:
        args.parser.error(str(error))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `decoupled suggest --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
