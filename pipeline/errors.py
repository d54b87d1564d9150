"""The one exception type that means "the user gave bad input": the CLI prints
``error: <message>`` on stderr and exits 2, with no traceback."""


class UserError(Exception):
    """Bad input or bad params. The message says what is wrong and how to fix it."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread (pipeline.system.handle_sigterm) so the run unwinds as for
    Ctrl-C: MLflow runs end KILLED, the CLI prints `error: interrupted (SIGTERM)` and exits 143."""

    exit_code = 143
    signal_name = "SIGTERM"
