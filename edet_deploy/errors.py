"""The one exception type for errors a user can cause (bad input, missing files, missing extras)."""


class EdetError(Exception):
    """An error the user can fix; the CLI prints its message on one line and exits with code 2."""
