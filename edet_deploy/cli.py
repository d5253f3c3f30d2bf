"""The `edet-deploy` command. Each subcommand is a small function. Whatever goes wrong reaches the user as one
line on stderr and an exit code (README, "Exit codes"): 2 bad input, 1 runtime failure, 130 interrupted,
141 standard output closed early (`| head`), as a command that SIGPIPE ended."""
from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import threading
from typing import List, Optional

from .cli_args import OutputPath, one_line, output_clash
from .errors import EdetError
from .io import NO_ROOM as _NO_ROOM
from .io import STOP_SIGNALS
from .log import logger

EXIT_CODES = {0: "success", 1: "runtime failure (a server gone, a runtime that failed, a bug of ours)",
              2: "bad input (an option, a file, a missing extra)", 129: "hung up (SIGHUP: its terminal closed)",
              130: "interrupted (Ctrl-C)", 141: "standard output closed early (`| head`)",
              143: "terminated (SIGTERM: kill, a container stopped)"}


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
        suffix = getattr(action.type, "help_suffix", None)
        if suffix and f"[{suffix()}]" not in help:  # a numeric option's range, and its special values' meaning
            help = f"{help} [{suffix().replace('%', '%%')}]".strip()
        if "%(default)" in help or "default" in help.lower() or not self.shows_default(action):
            return help
        return f"{help} (default: %(default)s)".strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help and action.help.strip()) and action.help is not argparse.SUPPRESS \
                and (self.shows_default(action) or hasattr(action.type, "help_suffix")):
            action = copy.copy(action)  # argparse prints no help line for an option without help
            action.help = ""
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of ours (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see '{self.prog} --help')\n")


def add_global_options(parser: argparse.ArgumentParser, on_subcommand: bool) -> None:
    """-v / -q / --log-file, accepted before or after the subcommand. On a subcommand their default is
    SUPPRESS, so an unset flag there does not overwrite what was given before the subcommand."""
    unset = {"default": argparse.SUPPRESS} if on_subcommand else {}
    g = parser.add_argument_group("global options")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging", **unset)
    g.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only", **unset)
    g.add_argument("--log-file", metavar="FILE", type=OutputPath(append=True),
                   help="also write the log to FILE (serve: tritonserver's log too; default: stderr only)", **unset)


def build_parser() -> argparse.ArgumentParser:
    # The registry lives in commands.py (cli -> commands, never back), so there is no import cycle.
    from .commands import COMMANDS

    parser = Parser(
        prog="edet-deploy", formatter_class=DefaultsHelpFormatter,
        epilog="exit codes: " + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()),
        description="Export, optimise, serve and benchmark EfficientDet D0-D7x. "
                    "CPU: OpenVINO by default, ONNX Runtime as the reference; TensorRT where a GPU and TensorRT are "
                    "present.")
    from . import __version__
    parser.add_argument("--version", action="version", version=f"edet-deploy {__version__}")
    add_global_options(parser, on_subcommand=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.subcommands = {}  # type: ignore[attr-defined] - name -> its parser, for checks across its options
    for name, (help_text, fn) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=DefaultsHelpFormatter)
        sp.set_defaults(handler=fn(sp))
        add_global_options(sp, on_subcommand=True)
        parser.subcommands[name] = sp  # type: ignore[attr-defined]
    return parser


def setup_logging(verbose: bool, quiet: bool, log_file: Optional[str]) -> None:
    """Log lines on stderr, written through tqdm so they never break a progress bar; `log_file` gets them too."""
    from tqdm import tqdm

    class BarSafeHandler(logging.StreamHandler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                tqdm.write(self.format(record), file=self.stream)
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)

    handlers: List[logging.Handler] = [BarSafeHandler(sys.stderr)]
    if log_file:
        try:
            handlers.append(logging.FileHandler(log_file))
        except OSError as e:
            raise EdetError(f"cannot write the log file {log_file}: {e.strerror}") from None
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)


def _stdout_closed() -> int:
    """The reader of our stdout went away (`| head`): say nothing more, and keep Python from complaining
    about the unflushed rest at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return 141


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (`kill`, a closed terminal, a container stopped) in a command: it unwinds the work as
    Ctrl-C does, so staged and atomic writes are undone (io) and started servers stopped, then the command exits
    128 + the signal's number (143 for SIGTERM) with one line. `serve` puts its own handlers in place."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_received: List[int] = []  # the stop signals this process got, in order


# Python that C++ calls back and that cannot pass an exception on: ONNX Runtime's custom ops (our soft-NMS op in
# the onnxruntime backend). An exception raised there ends in std::terminate: SIGABRT and a core dump.
_NATIVE_CALLBACKS = ("/onnxruntime_extensions/",)
_REDELIVER_S = 0.05


def _in_native_callback(frame) -> bool:
    while frame is not None:
        if any(part in frame.f_code.co_filename for part in _NATIVE_CALLBACKS):
            return True
        frame = frame.f_back
    return False


def _on_stop(signum: int, frame) -> None:
    if _in_native_callback(frame):  # not here: the signal comes again shortly, until it finds Python of ours
        timer = threading.Timer(_REDELIVER_S, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    _received.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)


def _catch_stops() -> dict:
    """Ctrl-C, SIGTERM and SIGHUP become exceptions that unwind the command (SIGTERM and SIGHUP would otherwise
    kill it outright: no cleanup, temporary files left), and are remembered: a library that turns the
    KeyboardInterrupt it met into an error of its own (numpy's or torch's import does) is still an interruption,
    not an internal error. Returns the handlers replaced, for `main` to put back."""
    replaced = {}
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):  # an ignored one stays so
                replaced[sig] = signal.signal(sig, _on_stop)
    return replaced


def _stopped(e: BaseException) -> int:
    signum = e.signum if isinstance(e, Terminated) else _received[0] if _received else signal.SIGINT
    if signum == signal.SIGINT:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"terminated ({signal.Signals(signum).name})", file=sys.stderr)
    return 128 + signum


_EXPORT_MODULES = {"torch", "torchvision", "timm", "onnxsim", "safetensors"}  # the [export] extra


def main(argv: Optional[List[str]] = None) -> int:
    del _received[:]
    replaced = _catch_stops()
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # while the parser was built (its imports)
        return _stopped(e)
    except Exception:
        if _received:  # an import that made an error of its own of the interruption (numpy's does)
            return _stopped(KeyboardInterrupt())
        raise
    finally:
        for sig, handler in replaced.items():
            signal.signal(sig, handler)


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except BrokenPipeError:  # `edet-deploy --help | head`
        return _stdout_closed()
    except SystemExit as e:
        if e.code in (0, None):  # --help, --version
            raise
        return 2  # a usage error, already printed on one line
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    prefix = f"edet-deploy {args.command}: error:"
    # Before any work: flags that contradict each other, an output that would overwrite what the command reads.
    refusal = ("-v (debug logging) and -q (warnings only) contradict each other: give one"
               if args.verbose and args.quiet
               else output_clash(args, [*parser._actions, *parser.subcommands[args.command]._actions]))
    if refusal:
        print(f"{prefix} {refusal}", file=sys.stderr)
        return 2
    try:
        setup_logging(args.verbose, args.quiet, args.log_file)
        from . import __version__
        logger.debug("edet-deploy %s (version %s), options %s", args.command, __version__,
                     {k: v for k, v in vars(args).items() if k != "handler"})
        return int(args.handler(args) or 0)
    except KeyboardInterrupt as e:
        return _stopped(e)
    except Exception as e:  # noqa: BLE001 - each kind of failure is one line (_failed)
        if _received:  # what unwinding the interruption ran into, or made of it (a library's own error)
            return _stopped(KeyboardInterrupt())
        return _failed(prefix, e, args.verbose)


def _failed(prefix: str, e: Exception, verbose: bool) -> int:
    """The one line (and exit code) of a command that failed with `e`."""
    if isinstance(e, EdetError):
        message = " ".join(str(e).split())  # one line, whatever the message carries
        print(f"{prefix} {message}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, BrokenPipeError):
        return _stdout_closed()
    if isinstance(e, OSError):
        if e.errno in _NO_ROOM:  # a full disk or quota: no fault of the command line (io names the output)
            print(f"{prefix} cannot write {e.filename or 'the output'}: {e.strerror}", file=sys.stderr)
            return 1
        if e.filename is not None:
            # An output (or input) path that cannot be created, written or read: the user's to fix.
            print(f"{prefix} cannot access {e.filename}: {e.strerror}", file=sys.stderr)
            return 2
        # A connection refused or reset, a full disk: nothing the command line can fix.
        print(f"{prefix} {e.strerror or type(e).__name__}", file=sys.stderr)
        return 1
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in _EXPORT_MODULES:
        # The serving install has no PyTorch: commands that build models say what to install.
        print(f"{prefix} needs {e.name}, which the serving install leaves out: pip install 'edet-deploy[export]'",
              file=sys.stderr)
        return 2
    return _internal_error(prefix, e, verbose)  # our bug: one line, the traceback with -v


def _internal_error(prefix: str, e: BaseException, verbose: bool) -> int:
    if verbose:
        import traceback
        traceback.print_exception(e)
    message = " ".join(f"{type(e).__name__}: {e}".split())
    print(f"{prefix} internal error: {message} (a bug: please report it with the output of -v)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    from edet_deploy.cli import main as _main  # the registered commands live in the package module

    sys.exit(_main())
