"""The `edet-deploy` command. Each subcommand is a small function; user errors (EdetError) become one line on
stderr and exit code 2."""
from __future__ import annotations

import argparse
import copy
import logging
import sys
from typing import List, Optional

from .errors import EdetError
from .log import logger


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once. Unlike argparse.ArgumentDefaultsHelpFormatter it skips defaults that say
    nothing (None, False, empty), defers to a help text that already states its default, and also shows the
    default of an option declared without help."""

    @staticmethod
    def shows_default(action: argparse.Action) -> bool:
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, (str, list, tuple)) and not d):
            return False
        return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "%(default)" in help or "default" in help.lower() or not self.shows_default(action):
            return help
        return f"{help} (default: %(default)s)".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help and action.help.strip()) and action.help is not argparse.SUPPRESS \
                and self.shows_default(action):
            action = copy.copy(action)  # argparse prints no help line for an option without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def build_parser() -> argparse.ArgumentParser:
    # The registry lives in commands.py (cli -> commands, never back), so there is no import cycle.
    from .commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="edet-deploy",
        description="Export, optimise, serve and benchmark EfficientDet D0-D7x. "
                    "CPU: OpenVINO by default, ONNX Runtime as the reference; TensorRT where a GPU and TensorRT are "
                    "present.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"edet-deploy {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, fn) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=DefaultsHelpFormatter)
        sp.set_defaults(handler=fn(sp))
    return parser


_EXPORT_MODULES = {"torch", "torchvision", "timm", "onnxsim", "safetensors"}  # the [export] extra


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except EdetError as e:
        message = " ".join(str(e).split())  # one line, whatever the message carries
        print(f"edet-deploy {args.command}: error: {message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: our bug, keep the traceback
            raise
        # An output (or input) path that cannot be created, written or read: the user's to fix.
        print(f"edet-deploy {args.command}: error: cannot access {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        # The serving install has no PyTorch: commands that build models say what to install.
        if (e.name or "").split(".")[0] not in _EXPORT_MODULES:
            raise
        print(f"edet-deploy {args.command}: error: needs {e.name}, which the serving install leaves out: "
              f"pip install 'edet-deploy[export]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from edet_deploy.cli import main as _main  # the registered commands live in the package module

    sys.exit(_main())
