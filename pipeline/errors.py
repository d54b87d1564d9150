"""The one exception type that means "the user gave bad input": the CLI prints
``error: <message>`` on stderr and exits 2, with no traceback."""


class UserError(Exception):
    """Bad input or bad params. The message says what is wrong and how to fix it."""

    exit_code = 2
