"""The user-facing error type, in a module of its own so that every other module can import it."""


class IlladaError(Exception):
    """A user-facing problem: the message is one line that names the problem and the fix."""


class IlladaWarning(UserWarning):
    """A user-facing warning (a model close to the memory limit, an unconverted checkpoint): one line naming
    the risk and the fix. Library calls issue it through `warnings`; the commands print it."""


class ContextError(IlladaError):
    """The prompt and the generation do not fit the model's positions (the server's context_length_exceeded)."""


def one_line(text: str) -> str:
    """A message as one line: its lines joined with '; '."""
    return "; ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())
