"""The one exception type users see: a message that names the file, field or row and what was expected."""


class QLRError(Exception):
    """Bad input or a missing asset. Entry points print the message alone and exit non-zero."""
