"""Errors a user can act on. The CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """Bad input or an impossible request; the message names the file, field, tensor or layer."""


class ConfigError(UserError):
    """A model config that builder cannot accept."""


class ParallelismError(UserError):
    """A tp/pp layout that the model's layers cannot be split into."""


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error, naming the path(s) it concerns."""
    reason = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    if paths:
        return f"{' -> '.join(paths)}: {reason}"
    return f"{reason} ({type(err).__name__})"
