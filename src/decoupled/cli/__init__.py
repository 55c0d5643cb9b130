"""The `decoupled` command: one module per subcommand, each with `add_parser` and `run`.

Bad arguments exit with status 2 and one line on stderr (`decoupled suggest: error: ...`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import re
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
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
