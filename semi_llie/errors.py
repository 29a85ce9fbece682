"""Errors a user can cause. The CLI prints their message as one sentence and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (paths, images, config), not a bug: no traceback is shown."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration: unknown key, wrong type, unknown `type:`."""
