"""The user-facing error type, in a module of its own so that every other module can import it."""


class IlladaError(Exception):
    """A user-facing problem: the message is one line that names the problem and the fix."""
