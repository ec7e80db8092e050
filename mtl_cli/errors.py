"""Errors that are the user's to fix: the CLI prints their message and exits with status 2, no traceback."""


class UserError(Exception):
    """A bad config, a missing file, a checkpoint from elsewhere: something the user can correct."""
