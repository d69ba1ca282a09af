"""Why a conversion did not happen, as one line, plus what a program needs to react to it."""

import os
import resource
import signal

# Exit statuses of the command line; the API raises ConversionError with the same `.status`.
EXIT_INPUT, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3


class ConversionError(Exception):
    """Its text is one line that names the file and the problem; what `role` and `kind` say is not
    repeated in it (the command line adds "loader failed: " or "saver failed: ", see line()).

    `role`: "loader", "saver" or "arguments" (None while a side is still unknown); `kind`: "input" for
    bad input or options, "internal" for a bug of ours or a plugin's, "interrupted" for a signal or
    a cancel; `status`: the command line's exit status for it; `path`: the file or folder at fault, where
    one is (else None); `side_failed`: the loader or saver raised it itself (not the parent about it)."""

    def __init__(self, message, role=None, kind="input", status=EXIT_INPUT, path=None):
        super().__init__(message)
        self.role, self.kind, self.status = role, kind, status
        self.path = None if path is None else str(path)
        self.side_failed = False

    def line(self):
        """The command line's text for it: "<role> failed: <message>" when a side raised it."""
        return f"{self.role} failed: {self}" if self.side_failed else str(self)


def first_line(error):
    """An exception's message as one line, for an error line that quotes a library's complaint."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def address_space_limit():
    """This process's `ulimit -v` in bytes, or None where it has none."""
    try:
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (OSError, ValueError, AttributeError):
        return None
    return None if limit == resource.RLIM_INFINITY else limit


def memory_hint():
    """What to do about memory that could not be mapped or allocated: raise `ulimit -v` where it is set."""
    limit = address_space_limit()
    if limit is None:
        return " (free memory, or check `ulimit -v`)"
    return f" (this process may use {limit / 2**30:.3g} GiB of address space: raise `ulimit -v`)"


def require_folder(path):
    """A source folder is there: the one wording detect, convert and every loader use for a missing one."""
    require(os.path.isdir(path), f"{path}: no such model folder", path=path)


def require(condition, message, path=None):
    """Raise ConversionError(message, path=path) unless condition holds; keeps checks to one line each."""
    if not condition:
        raise ConversionError(message, path=path)


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGHUP), raised wherever the process is, so that every
    `except BaseException` cleanup runs; a BaseException so no plugin's `except Exception` swallows it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
