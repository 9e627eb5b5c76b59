"""Errors a user can act on. The CLI prints them without a traceback and exits 2."""


class UserError(Exception):
    """Bad input or an impossible request; the message names the file, field, tensor or layer."""


class ConfigError(UserError):
    """A model config that builder cannot accept."""


class ParallelismError(UserError):
    """A tp/pp layout that the model's layers cannot be split into."""
