"""`python -m converter_core` and the `converter-core` script."""

import gc
import os
import signal
import sys

from converter_core.errors import Interrupted, address_space_limit, first_line, memory_hint

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def program():
    """cli.main(), then exit without the interpreter's teardown. Everything is written and flushed by
    then; the teardown only unregisters torch's operator libraries one by one, which took half a second
    of every run.

    This process collects no garbage: importing torch creates about a million objects, and the
    collections they set off took 0.1-0.17 s of a 2 s conversion. After the imports it only parses
    flags, starts the loader and saver and relays their events; they collect their own garbage."""
    gc.disable()
    for number in STOP_SIGNALS:  # from the first moment: a stop while torch imports is one line too
        signal.signal(number, _stop)
    sys.unraisablehook = _swallowed_stop
    try:
        status = _run()
    except Interrupted as stop:  # before a conversion started (the conversion reports its own)
        if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
            print(f"converter_core: error: interrupted by {stop}", file=sys.stderr)  # torchrun: rank 0 says why
        status = 128 + stop.signum
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _run():
    """cli.main()'s exit status. A library that fails to import is one line: under a low `ulimit -v`,
    torch, numpy and safetensors fail in many ways (MemoryError, "failed to map segment from shared
    object", std::bad_alloc, a SystemError), none of them ours to print as a traceback."""
    try:
        from converter_core.cli import main
    except Exception as error:
        if _stopped_by is not None:  # a stop inside a library's import can surface as another error
            raise Interrupted(_stopped_by) from None
        if os.environ.get("CONVERTER_CORE_DEBUG"):
            raise
        hint = memory_hint() if isinstance(error, MemoryError) or address_space_limit() else ""
        print(f"converter_core: error: cannot import its libraries ({type(error).__name__}: {first_line(error)})"
              f"{hint}", file=sys.stderr)
        return 1
    global _imported
    _imported = True
    if _stopped_by is not None:  # a stop that landed where Python swallows exceptions (_swallowed_stop)
        raise Interrupted(_stopped_by)
    try:
        main()
    except SystemExit as end:  # as the interpreter would end: None is 0, a message is printed and 1
        if end.code is None or isinstance(end.code, int):
            return end.code or 0
        print(end.code, file=sys.stderr)
        return 1
    except MemoryError:  # a conversion reports its own; this is argument parsing or plugin discovery
        print(f"converter_core: error: out of memory while starting{memory_hint()}", file=sys.stderr)
        return 1
    return 0


_stopped_by = None
_imported = False


def _stop(signum, frame):
    global _stopped_by
    _stopped_by = signum
    raise Interrupted(signum)


def _swallowed_stop(event):
    """A stop raised inside a weakref callback or a __del__ (importlib runs some while torch imports) is
    swallowed by Python, which would print its traceback: stay silent; _run raises it once the imports
    are done, and later (a conversion's own handler) the signal is delivered again a moment after."""
    if not isinstance(event.exc_value, Interrupted):
        sys.__unraisablehook__(event)
    elif _imported:
        from converter_core import orchestrator
        orchestrator.redeliver(event.exc_value.signum)


if __name__ == "__main__":
    program()
