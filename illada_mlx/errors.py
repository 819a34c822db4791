"""The user-facing error type, in a module of its own so that every other module can import it."""


class IlladaError(Exception):
    """A user-facing problem: the message is one line that names the problem and the fix."""


class IlladaWarning(UserWarning):
    """A user-facing warning (a model close to the memory limit, an unconverted checkpoint): one line naming
    the risk and the fix. Library calls issue it through `warnings`; the commands print it."""
