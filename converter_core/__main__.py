"""`python -m converter_core` and the `converter-core` script."""

import gc
import os
import signal
import sys

from converter_core.errors import Interrupted

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
    try:
        from converter_core.cli import main
        main()
        status = 0
    except SystemExit as end:  # as the interpreter would end: None is 0, a message is printed and 1
        status = 0 if end.code is None else end.code
        if not isinstance(status, int):
            print(status, file=sys.stderr)
            status = 1
    except Interrupted as stop:  # before a conversion started (the conversion reports its own)
        print(f"converter_core: error: interrupted by {stop}", file=sys.stderr)
        status = 128 + stop.signum
    except MemoryError:  # while importing torch under a low `ulimit -v`
        print("converter_core: error: out of memory while starting (raise `ulimit -v`, or free memory)", file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _stop(signum, frame):
    raise Interrupted(signum)


if __name__ == "__main__":
    program()
