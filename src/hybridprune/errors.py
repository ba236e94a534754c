"""One exception type for bad input: the CLI prints its message on one line and exits 2."""


class HybridPruneError(Exception):
    """A user-facing error. The message should name the fix."""
