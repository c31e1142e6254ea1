"""The one exception type a user can cause: the CLI prints its message as a single line."""


class FastByolError(Exception):
    """A failure caused by input (path, file, config value, machine); the message says what to do."""
