"""The one error type a user can cause.

Anything raised as :class:`UserError` reaches the command line as a single
line on stderr and exit code 2; everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: bad file, bad value, bad URL, ..."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError):
    """A configuration value, section, key or file that is not acceptable."""


class DataError(UserError):
    """A corpus or feature store that cannot be read as asked."""


class DataConfigError(DataError, ConfigError):
    """Data that this configuration cannot use although another one could (e.g. utterances
    longer than the model's outputs): in a search, the configuration is invalid."""
