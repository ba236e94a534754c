"""One exception type for bad input: the CLI prints its message on one line and exits 2."""
import importlib


class HybridPruneError(Exception):
    """A user-facing error. The message should name the fix."""


def interrupt_on_sigterm(signum, frame):
    """A SIGTERM handler that stops the work as Ctrl-C does, so temporaries are removed on the way out."""
    raise KeyboardInterrupt


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or say in one line which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HybridPruneError(f"{what} needs the `{module.split('.')[0]}` package: "
                               f"pip install 'hybridprune[{extra}]'") from None
