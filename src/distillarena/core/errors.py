"""Errors a user can fix. The CLI turns them into one clear message and exit status 2, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a config field, a file, a column, a model path. The message says what and where."""
