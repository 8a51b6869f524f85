"""The errors ppalli raises on purpose. The CLI prints them as one line, never a traceback."""


class PpalliError(Exception):
    """A user-facing error: the message names what is wrong (file, row, key) and the fix."""


class ConfigError(PpalliError):
    """A config key or value is wrong."""


class DataError(PpalliError):
    """A data file, row or column is wrong."""


class ModelError(PpalliError):
    """A model or tokenizer cannot be loaded as asked."""


class OutOfMemory(PpalliError):
    """The GPU ran out of memory and no smaller plan is left to step down to."""
