"""Exceptions that end a run with a one-line message instead of a traceback."""


class UserError(Exception):
    """Bad input (config, file, data): printed as one line, exit status 2."""
    exit_code = 2


class RunAborted(Exception):
    """A run-time condition that stops the run (non-finite update, divergence):
    one line, exit status 3."""
    exit_code = 3
