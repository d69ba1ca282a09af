"""Loader and saver in their own processes with one bounded queue between them, supervised: if
either fails (exception, sys.exit, killed), the other is stopped at once and the run exits non-zero
with a one-line reason. Nothing waits forever."""

import ctypes
import os
import sys
import traceback
from multiprocessing.connection import wait

import torch.multiprocessing as mp

from converter_core.errors import ConversionError
from converter_core.protocol import EXIT

GRACE_SECONDS = 10
DEBUG = bool(os.environ.get("CONVERTER_CORE_DEBUG"))


def _describe(error):
    if isinstance(error, ConversionError):
        return str(error)
    if isinstance(error, SystemExit):
        return str(error.code) if error.code not in (None, 0, 1) else "exited with an error"
    if isinstance(error, MemoryError):
        return "out of memory"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''} (unexpected; set CONVERTER_CORE_DEBUG=1 for a traceback)"


def _run_side(role, function, queue, args, reports, saver_finished):
    """Body of a child process: run the plugin, report a one-line failure, exit non-zero.

    A loader stays alive after sending until the saver has finished: tensors cross the queue as
    shared-memory handles that the sending process must still own when the saver opens them."""
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
        reports.put((role, _describe(error)))
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
    """Returns the process exit status."""
    _release_freed_tensors()
    context = mp.get_context("fork")
    queue = context.Queue(maxsize=args.max_queue_size)
    reports = context.SimpleQueue()
    saver_finished = context.Event()
    print("Starting saver...", flush=True)
    saver_process = context.Process(target=_run_side, name="saver",
                                    args=("saver", saver.save_checkpoint, queue, args, reports, saver_finished))
    saver_process.start()
    print("Starting loader...", flush=True)
    loader_process = context.Process(target=_run_side, name="loader",
                                     args=("loader", loader.load_checkpoint, queue, args, reports, saver_finished))
    loader_process.start()
    processes = {"loader": loader_process, "saver": saver_process}
    try:
        failure = _supervise(processes, saver_finished)
        if failure and failure[0] == "saver" and loader_process.is_alive():
            # A saver that stopped on the loader's "exit" fails second: let the loader report the cause.
            loader_process.join(LOADER_REPORT_SECONDS)
    except KeyboardInterrupt:
        failure = (None, "interrupted")
    for process in processes.values():
        _stop(process)
    if failure is None:
        print("Done!", flush=True)
        return 0
    print(f"converter_core: error: {_true_cause(failure, reports)}", file=sys.stderr, flush=True)
    return 1


LOADER_REPORT_SECONDS = 5


def _true_cause(failure, reports):
    """One line naming the side that failed first and why: the loader's own error wins (a saver only
    ever fails second, on its "exit"), then a process killed by a signal, then the saver's error."""
    role, observed = failure
    said = {}
    while not reports.empty():
        side, reason = reports.get()
        said.setdefault(side, reason)
    if "loader" in said:
        return f"loader failed: {said['loader']}"
    if role in said and "killed" not in observed:
        return f"{role} failed: {said[role]}"
    return observed


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
