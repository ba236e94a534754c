"""One exception type for bad input: the CLI prints its message on one line and exits 2."""


class HybridPruneError(Exception):
    """A user-facing error. The message should name the fix."""


def interrupt_on_sigterm(signum, frame):
    """A SIGTERM handler that stops the work as Ctrl-C does, so temporaries are removed on the way out."""
    raise KeyboardInterrupt
