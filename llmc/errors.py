"""Errors a user can fix: the CLI prints them without a traceback and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (config, paths, data), reported as one clear message."""


class ConfigError(UserError):
    """A config value is missing, unknown, of the wrong type or out of range."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
