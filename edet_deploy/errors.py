"""The exception types for errors a user meets: the CLI prints the message on one line and exits with the
type's code (README, "Exit codes")."""
from typing import Sequence


class EdetError(Exception):
    """An error the user can fix (bad input, missing files, missing extras): one line, exit code 2."""

    exit_code = 2


class EdetRuntimeError(EdetError):
    """A failure the input did not cause (a server that is gone or answers with an error, a runtime that
    fails): one line, exit code 1."""

    exit_code = 1


def first_few(items: Sequence[str], n: int = 5) -> str:
    """The first `n` of `items`, comma-separated, with ' ...' when there are more: a list inside a one-line error."""
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "")
