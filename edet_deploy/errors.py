"""The exception types for errors a user meets: the CLI prints the message on one line and exits with the
type's code (README, "Exit codes")."""


class EdetError(Exception):
    """An error the user can fix (bad input, missing files, missing extras): one line, exit code 2."""

    exit_code = 2


class EdetRuntimeError(EdetError):
    """A failure the input did not cause (a server that is gone or answers with an error, a runtime that
    fails): one line, exit code 1."""

    exit_code = 1
