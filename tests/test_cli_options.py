"""Every numeric option of every subcommand, walked from the real parser: out-of-range values are refused when
the command line is parsed (one line, exit 2, no traceback) unless the help documents what they mean; the
exit codes of the README happen as documented; global options work on either side of the subcommand."""
import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edet_deploy.cli import EXIT_CODES, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
NUMERIC_TYPES = (int, float)


def _subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _required_argv(sp: argparse.ArgumentParser) -> list:
    """The least a subcommand's parser accepts: a dummy for each positional and required option."""
    argv = []
    for a in sp._actions:
        if not a.option_strings and a.dest != "help":
            argv.append("x")
        elif a.required:
            argv += [a.option_strings[0]] if a.nargs == 0 else [a.option_strings[0], "x"]
    return argv


def _numeric_options():
    rows = []
    for name, sp in _subcommands().items():
        for a in sp._actions:
            if not a.option_strings or a.nargs == 0:
                continue
            numeric_default = isinstance(a.default, NUMERIC_TYPES) and not isinstance(a.default, bool)
            if a.type in NUMERIC_TYPES or numeric_default or hasattr(a.type, "help_suffix"):
                rows.append((name, a))
    return rows


NUMERIC = _numeric_options()


def test_the_walk_finds_the_options_the_issue_names():
    names = {(cmd, a.option_strings[-1]) for cmd, a in NUMERIC}
    assert {("calibrate", "--num-images"), ("serve", "--http-port"), ("bench", "--iters"), ("bench", "--warmup"),
            ("bench", "--seconds"), ("export", "--image-size"), ("export", "--num-classes"),
            ("export", "--max-detections"), ("eval", "--max-images"), ("make-shapes", "--val"),
            ("detect", "--threads"), ("bench", "--batch")} <= names
    assert len(NUMERIC) > 40


@pytest.mark.parametrize("cmd,action", NUMERIC, ids=[f"{c}{a.option_strings[-1]}" for c, a in NUMERIC])
def test_numeric_option_refuses_out_of_range_in_one_line(cmd, action, capsys):
    # A bare int/float type would let -5, 0, NaN and 10^12 through to the library: each option declares a range.
    assert action.type not in NUMERIC_TYPES, f"{cmd} {action.option_strings[-1]} takes any {action.type.__name__}"
    base = [cmd, *_required_argv(_subcommands()[cmd])]
    help_text = " ".join(_option_help(cmd, action).split())  # what `--help` prints for this option
    flag = action.option_strings[-1]
    for value in ["-5", "0", "1000000000000", "1e300", "nan", "inf", "-inf", "abc", ""]:
        try:
            args = build_parser().parse_args([*base, flag, value])
        except SystemExit as e:
            err = capsys.readouterr().err
            assert e.code == 2, (flag, value, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err, err
            assert lines[0].startswith(f"edet-deploy {cmd}: error: argument {action.option_strings[0]}") or \
                flag in lines[0], lines[0]
            continue
        got = getattr(args, action.dest)
        number = got[0] if isinstance(got, list) else got
        # Accepted: then it is a value the help documents (a stated range from 0, or what 0 means); nothing
        # negative, non-finite, astronomically large or empty gets through.
        assert value not in ("-5", "1000000000000", "1e300", "nan", "inf", "-inf", "abc", ""), (flag, value, got)
        if isinstance(number, (int, float)) and number == 0:
            assert re.search(r"\[0\.\.|\b0: \w", help_text), f"{flag} accepts 0 without saying so: {help_text}"


def _option_help(cmd, action) -> str:
    text = _subcommands()[cmd].format_help()
    flag = action.option_strings[-1]
    block = text[text.index(f"  {flag}"):]
    nxt = re.search(r"\n  -", block[2:])
    return block[: nxt.start() + 2] if nxt else block


def _run(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "edet_deploy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("argv", [
    ["calibrate", "g.onnx", "--data", "d", "--num-images", "-5"],
    ["calibrate", "g.onnx", "--data", "d", "--num-images", "0"],
    ["serve", "--http-port", "70000"],
    ["serve", "--http-port", "-1"],
    ["bench", "--iters", "0", "--warmup", "0"],
    ["bench", "--seconds", "-1"],
    ["bench", "--batch", "0,8"],
    ["build", "g.onnx", "--out", "e.plan", "--batch", "1:4:100000"],
    ["export", "--image-size", "0"],
    ["export", "--num-classes", "0"],
    ["export", "--max-detections", "0"],
    ["eval", "--data", "d", "--max-images", "-3"],
    ["make-shapes", "--val", "-1"],
    ["detect", "x.jpg", "--threads", "-3"],
])
def test_issue_cases_exit_2_with_one_line_before_any_work(argv, tmp_path):
    out = _run(*argv, cwd=tmp_path)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edet-deploy {argv[0]}: error: argument "), out.stderr
    assert out.stdout == ""


def test_readme_exit_code_table_matches_the_cli():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Exit codes")
    section = readme[start:readme.index("\n#", start + 1)]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", section, flags=re.M))
    assert {int(k) for k in rows} == set(EXIT_CODES)


def test_closed_stdout_is_141_without_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "edet_deploy", "models"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the table is written, as `| head -1` is after one line
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141 and err == "", err
    proc.stderr.close()


def test_interrupt_is_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "edet_deploy", "make-shapes", "--out", str(tmp_path / "s"),
                             "--train", "200000", "--val", "0", "--calib", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        # make-shapes writes into a temporary folder beside --out, moved into place when complete
        while not any(tmp_path.glob("*/images/train/*.jpg")) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip() == "interrupted", err
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_unexpected_failure_is_one_line_exit_1_and_traceback_only_with_v(monkeypatch, capsys):
    from edet_deploy import commands

    def broken(p):
        return lambda args: {}["our bug"]
    monkeypatch.setitem(commands.COMMANDS, "models", ("list", broken))
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "internal error: KeyError" in err and "Traceback" not in err
    assert main(["models", "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_options_before_or_after_the_subcommand(where, tmp_path):
    log = tmp_path / "log.txt"
    opts = ["-v", "--log-file", str(log)]
    cmd = ["make-shapes", "--out", str(tmp_path / "s"), "--train", "1", "--val", "0", "--calib", "0"]
    out = _run(*(opts + cmd if where == "before" else cmd + opts))
    assert out.returncode == 0, out.stderr
    assert "DEBUG edet_deploy: edet-deploy make-shapes" in log.read_text()
    quiet = _run(*(["-q", "--log-file", str(log)] + cmd if where == "before" else cmd + ["-q", "--log-file", str(log)]))
    assert quiet.returncode == 0 and log.read_text().count("DEBUG") == 1
    bad = _run(*cmd, "--log-file", str(tmp_path / "missing" / "log.txt"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


LONG_JOBS = ("export", "calibrate", "build", "bench", "eval", "train", "make-shapes", "triton-repo")


@pytest.mark.parametrize("cmd", LONG_JOBS)
def test_long_jobs_take_no_progress(cmd):
    assert "--no-progress" in {s for a in _subcommands()[cmd]._actions for s in a.option_strings}


def test_no_bar_in_output_that_is_not_a_terminal(tmp_path):
    out = _run("make-shapes", "--out", str(tmp_path / "s"), "--train", "30", "--val", "5", "--calib", "0")
    assert out.returncode == 0 and "\r" not in out.stderr and "it/s" not in out.stderr, out.stderr
