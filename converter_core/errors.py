"""The one exception type that means "the input or the request is wrong", not "we have a bug"."""


class ConversionError(Exception):
    """Its text is the single line the user sees: name the file and the problem."""


def require(condition, message):
    """Raise ConversionError(message) unless condition holds; keeps checks to one line each."""
    if not condition:
        raise ConversionError(message)


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGHUP), raised wherever the process is, so that every
    `except BaseException` cleanup runs; a BaseException so no plugin's `except Exception` swallows it."""

    def __init__(self, signum):
        import signal
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
