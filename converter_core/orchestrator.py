"""Loader and saver in their own processes with one bounded queue between them, supervised: if
either fails (exception, sys.exit, killed), the other is stopped at once and the run exits non-zero
with a one-line reason naming the side that failed first. A signal to the parent (SIGTERM, SIGINT,
SIGHUP) or its death stops both children, which remove their staged output. Nothing waits forever."""

import ctypes
import errno
import os
import signal
import sys
import traceback
from multiprocessing.connection import wait

import torch.multiprocessing as mp

from converter_core import output, protocol
from converter_core.errors import ConversionError, Interrupted
from converter_core.protocol import EXIT

GRACE_SECONDS = 10
LOADER_REPORT_SECONDS = 5
DEBUG = bool(os.environ.get("CONVERTER_CORE_DEBUG"))
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
EXIT_INPUT, EXIT_INTERNAL = 1, 3
WRITE_FAILURES = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _describe(error):
    """(one line, internal?) for an exception raised in a plugin."""
    if isinstance(error, ConversionError):
        return str(error), False
    if isinstance(error, SystemExit):
        return (str(error.code) if error.code not in (None, 0, 1) else "exited with an error"), False
    if isinstance(error, MemoryError):
        return "out of memory", False
    if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
        return f"{error.filename or 'output'}: cannot write ({error.strerror})", False
    text = str(error).strip().splitlines()
    return (f"{type(error).__name__}: {text[0] if text else ''} "
            "(unexpected; set CONVERTER_CORE_DEBUG=1 for a traceback)"), True


def _die_with_parent(parent_pid):
    """Linux: the kernel sends SIGTERM when the parent dies (even by SIGKILL); elsewhere the staged
    output still refuses to commit once the parent is gone (output.still_wanted)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


PR_SET_PDEATHSIG = 1


def _run_side(role, function, queue, args, reports, saver_finished, parent_pid):
    """Body of a child process: run the plugin, report a one-line failure, exit non-zero.

    A loader stays alive after sending until the saver has finished: tensors cross the queue as
    shared-memory handles that the sending process must still own when the saver opens them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGHUP, _raise_interrupted)
    output.set_owner(parent_pid)
    _die_with_parent(parent_pid)
    protocol.stall_seconds = getattr(args, "stall_timeout", None) or None
    try:
        try:
            function(queue, args)
        except SystemExit as error:
            if error.code not in (None, 0):
                raise
        if role == "loader":
            queue.put(EXIT)  # harmless after "done"; ends a saver still waiting if the loader never sent it
            saver_finished.wait()
    except BaseException as error:
        if DEBUG:
            traceback.print_exc()
        if not isinstance(error, Interrupted):  # the parent stopped us and knows why
            reports.put((role, *_describe(error)))
        if role == "loader":
            try:
                queue.put_nowait(EXIT)
            except Exception:
                pass
        sys.stdout.flush()
        os._exit(1)


def _release_freed_tensors():
    """Layer tensors are tens of MB. glibc raises its mmap threshold after the first such free and then
    keeps later ones in its heap, so freed layers pile up as private memory; a fixed threshold returns
    each to the system at once. Set before forking so both sides inherit it; a no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def run(args, loader, saver):
    """Returns the process exit status: 0 done, 1 failed (bad input), 3 internal error, 128 + N when
    stopped by signal N. The save-dir lock is held for the whole run."""
    lock = output.SaveDirLock(args.save_dir)
    _release_freed_tensors()
    context = mp.get_context("fork")
    reports = context.SimpleQueue()
    processes = {}
    previous = {number: signal.signal(number, _raise_interrupted) for number in STOP_SIGNALS}
    try:
        failure = _start_and_supervise(context, args, loader, saver, reports, processes)
        status = EXIT_INPUT
    except Interrupted as stop:
        failure, status = (None, f"interrupted by {stop}"), 128 + stop.signum
    finally:
        for number in STOP_SIGNALS:  # a second signal must not cut the cleanup short
            signal.signal(number, signal.SIG_IGN)
        for process in processes.values():
            _stop(process)
        lock.release()
        for number, handler in previous.items():
            signal.signal(number, handler)
    if failure is None:
        print("Done!", flush=True)
        return 0
    message, internal = _true_cause(failure, reports)
    print(f"converter_core: error: {message}", file=sys.stderr, flush=True)
    return EXIT_INTERNAL if internal and status == EXIT_INPUT else status


def _start_and_supervise(context, args, loader, saver, reports, processes):
    """Start saver then loader (recorded in `processes` at once, so an interruption stops them) and
    supervise them; returns None or the first failure observed."""
    queue = context.Queue(maxsize=args.max_queue_size)
    saver_finished = context.Event()
    parent = os.getpid()
    print("Starting saver...", flush=True)
    processes["saver"] = context.Process(target=_run_side, name="saver", args=(
        "saver", saver.save_checkpoint, queue, args, reports, saver_finished, parent))
    processes["saver"].start()
    print("Starting loader...", flush=True)
    processes["loader"] = context.Process(target=_run_side, name="loader", args=(
        "loader", loader.load_checkpoint, queue, args, reports, saver_finished, parent))
    processes["loader"].start()
    failure = _supervise({role: processes[role] for role in ("loader", "saver")}, saver_finished)
    if failure and failure[0] == "saver" and processes["saver"].exitcode > 0 and processes["loader"].is_alive():
        # A saver that stopped on the loader's "exit" fails second: let the loader report the cause.
        processes["loader"].join(LOADER_REPORT_SECONDS)
    return failure


def _true_cause(failure, reports):
    """(one line, internal?) naming the side that failed first and why: an interruption of the run,
    else the loader's own error (a saver only ever fails second, on its "exit"), else a process killed
    by a signal, else the saver's error."""
    role, observed = failure
    said = {}
    while not reports.empty():
        side, reason, internal = reports.get()
        said.setdefault(side, (reason, internal))
    if role is None:
        return observed, False
    if "loader" in said:
        reason, internal = said["loader"]
        return f"loader failed: {reason}", internal
    if role in said and "killed" not in observed:
        reason, internal = said[role]
        return f"{role} failed: {reason}", internal
    return observed, False


def _supervise(processes, saver_finished):
    """Wait until both end well (None) or one fails: (role, what was observed)."""
    running = dict(processes)
    while running:
        timeout = GRACE_SECONDS if "saver" not in running else None
        ready = wait([p.sentinel for p in running.values()], timeout=timeout)
        if not ready:
            return "loader", "loader did not finish after the saver completed"
        for role, process in list(running.items()):
            if process.sentinel in ready:
                process.join()
                del running[role]
                if role == "saver":
                    saver_finished.set()
                if process.exitcode != 0:
                    return role, f"{role} " + (f"was killed by signal {-process.exitcode}" if process.exitcode < 0
                                               else f"exited with status {process.exitcode}")
    return None


def _stop(process):
    if process.is_alive():
        process.terminate()
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
