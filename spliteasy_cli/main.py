"""``spliteasy`` entry point.

Each subcommand lives in its own module exposing ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import nothing heavy at the top, so ``spliteasy
--help`` answers at once; TensorFlow and torch load only inside ``run``. Errors that
spliteasy raises on purpose become a one-line message and exit status 2, never a trace.
Library start-up noise (TensorFlow's CUDA/XLA pages, warnings) is removed once, here
(``spliteasy_cli.quiet``), before any subcommand imports a framework.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

SUBCOMMANDS = ["demo", "convert", "cuts", "serve", "train", "data", "export", "plan", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spliteasy",
        description="Split learning: A and C train on the device (TensorFlow), B on a PyTorch server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        if importlib.util.find_spec(f"spliteasy_cli.{name}") is None:
            continue  # a subcommand not shipped in this build
        module = importlib.import_module(f"spliteasy_cli.{name}")
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. ``argv=None`` is the real command line: only then is stderr
    routed through the noise filter (in-process callers, e.g. tests, keep their own)."""
    from .quiet import quiet_startup

    args = build_parser().parse_args(argv)
    restore = quiet_startup(argv_from_command_line=argv is None)
    from shared_schema import SpliteasyError

    try:
        return int(args._module.run(args) or 0)
    except SpliteasyError as exc:
        print(f"spliteasy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spliteasy {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if restore is not None:
            restore()


if __name__ == "__main__":
    sys.exit(main())
