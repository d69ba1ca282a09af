"""`python -m converter_core` and the `converter-core` script."""

import gc
import os
import sys


def program():
    """cli.main(), then exit without the interpreter's teardown. Everything is written and flushed by
    then; the teardown only unregisters torch's operator libraries one by one, which took half a second
    of every run.

    This process collects no garbage: importing torch creates about a million objects, and the
    collections they set off took 0.1-0.17 s of a 2 s conversion. After the imports it only parses
    flags, starts the loader and saver and relays their events; they collect their own garbage."""
    gc.disable()
    from converter_core.cli import main
    try:
        main()
        status = 0
    except SystemExit as end:  # as the interpreter would end: None is 0, a message is printed and 1
        status = 0 if end.code is None else end.code
        if not isinstance(status, int):
            print(status, file=sys.stderr)
            status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    program()
