"""`dsla-serve`: one command, a subcommand per job.

Each subcommand lives in its own module and registers itself through
`add_parser(subparsers)`; its handler returns the exit code. Imports stay
lazy so that `dsla-serve generate` does not pay for Ray.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# module -> subcommands it registers
_COMMAND_MODULES = ["deploy.commands_model", "deploy.commands_distill", "deploy.commands_serve"]


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dsla-serve", description="DSLA-Serve: adaptive DSLA conversion for LLM serving")
    sub = ap.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parsers(sub)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CLIError as e:
        # one line whatever the message holds (YAML and loader errors span several)
        print(f"dsla-serve {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dsla-serve generate ... | head`: the reader left; no traceback
        try:  # Python's own flush of stdout at exit would fail too
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141


if __name__ == "__main__":
    # Run as `python -m deploy.cli`, this file is `__main__`, and the subcommands raise the CLIError
    # of `deploy.cli`, a different class: dispatch through that module so it is the one caught.
    from deploy import cli

    sys.exit(cli.main())
