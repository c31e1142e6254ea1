"""The one exception type a user can cause: the CLI prints its message as a single line."""


class FastByolError(Exception):
    """A failure caused by input (path, file, config value, machine); the message says what to do."""


class RunStopped(Exception):
    """A run that stopped on a signal (SIGTERM from a scheduler, Ctrl-C) after writing its checkpoint: not an
    error; the CLI exits with ``exit_code`` (75, EX_TEMPFAIL: try again later, i.e. ``--resume``)."""

    exit_code = 75

    def __init__(self, message: str) -> None:
        super().__init__(message)
