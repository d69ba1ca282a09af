"""Loader and saver in their own processes with one bounded queue between them, supervised: if
either fails (exception, sys.exit, killed), the other is stopped at once and the run exits non-zero
with a one-line reason naming the side that failed first. A signal to the parent (SIGTERM, SIGINT,
SIGHUP) or its death stops both children, which remove their staged output. Nothing waits forever."""

import ctypes
import errno
import functools
import gc
import importlib
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait

import torch.multiprocessing as mp

from converter_core import dry_run, file_refs, output, protocol
from converter_core.errors import EXIT_INPUT, EXIT_INTERNAL, ConversionError, Interrupted, first_line, memory_hint
from converter_core.protocol import EXIT

GRACE_SECONDS = 10
LOADER_REPORT_SECONDS = 5
POLL_SECONDS = 0.1
EXIT_CANCELLED = 128 + signal.SIGINT
# How children start: "fork" (Linux; fastest) or "spawn" (macOS's default; everything they need is
# picklable). One setting, CONVERTER_CORE_START_METHOD, for a whole run or test session.
START_METHOD = os.environ.get("CONVERTER_CORE_START_METHOD", "fork")
DEBUG = bool(os.environ.get("CONVERTER_CORE_DEBUG"))
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
WRITE_FAILURES = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG)


def _raise_interrupted(signum, frame):
    if not output.defer_signal(signum):
        raise Interrupted(signum)


def stop_on_signals(gate=None):
    """A child side's stop signals (SIGTERM, SIGHUP) raise Interrupted wherever it is, with two exceptions
    that would lose a stop or its cleanup, where the signal is delivered again a moment later instead:
    while an exception is being handled (the side is cleaning up after a failure, e.g. removing its
    staged output: cut short, that would be left behind), and inside a weakref callback or a __del__,
    where Python swallows the exception (printing a traceback) and carries on."""
    handler = functools.partial(_stop_side, gate)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)
    sys.unraisablehook = _redeliver_swallowed_stop


REDELIVER_SECONDS = 0.05


def _stop_side(gate, signum, frame):
    if output.defer_signal(signum, gate):
        return
    if sys.exc_info()[1] is not None:
        redeliver(signum)
        return
    raise Interrupted(signum)


def _redeliver_swallowed_stop(event):
    if not isinstance(event.exc_value, Interrupted):
        return sys.__unraisablehook__(event)
    redeliver(event.exc_value.signum)


def redeliver(signum):
    """Send `signum` to the main thread again after REDELIVER_SECONDS (from a timer thread, so it lands
    after the code that could not take it)."""
    timer = threading.Timer(REDELIVER_SECONDS, signal.pthread_kill, (threading.main_thread().ident, signum))
    timer.daemon = True
    timer.start()


def _describe(error):
    """(one line, internal?) for an exception raised in a plugin."""
    # Memory that could not be mapped or allocated (ENOMEM: torch's "unable to mmap", its allocator's
    # "can't allocate memory", safetensors' "os error 12", a MemoryError), often a `ulimit -v`: say what.
    out_of_memory = ("unable to mmap", "can't allocate memory", "Cannot allocate memory", "os error 12")
    if isinstance(error, ConversionError):
        text = str(error)
        if any(sign in text for sign in out_of_memory) and "ulimit -v" not in text:
            text += memory_hint()  # e.g. a loader's "cannot read ... (Cannot allocate memory)"
        return text, False
    if isinstance(error, SystemExit):
        return (str(error.code) if error.code not in (None, 0, 1) else "exited with an error"), False
    if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
        return f"{error.filename or 'output'}: cannot write ({error.strerror})", False
    text = str(error).strip().splitlines()
    if isinstance(error, MemoryError) or isinstance(error, OSError) and error.errno == errno.ENOMEM or any(
            sign in (text[0] if text else "") for sign in out_of_memory):
        what = f"{error.filename}: {error.strerror}" if isinstance(error, OSError) and error.filename else (
            text[0] if text else "an allocation failed")
        return f"out of memory: {what}{memory_hint()}", False
    return (f"{type(error).__name__}: {text[0] if text else ''} "
            "(unexpected; set CONVERTER_CORE_DEBUG=1 for a traceback)"), True


def _die_with_parent(parent_pid):
    """Linux: the kernel sends SIGTERM when the parent dies (even by SIGKILL); elsewhere the staged
    output still refuses to commit once the parent is gone (output.CommitGate.still_wanted)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


PR_SET_PDEATHSIG = 1


def _run_side(role, plugin_modules, entry, queue, args, reports, events, saver_finished, parent_pid, gate):
    """Body of a child process: run the plugin, report a one-line failure, exit non-zero.

    Both plugin modules (`plugin_modules`: the loader's and the saver's names) are imported, in the
    parent's order, before this side's `entry` runs: a message key either registers at import time is then
    known to both sides under spawn too, as under fork, where the children inherit the parent's imports.

    A loader stays alive after sending until the saver has finished: tensors cross the queue as
    shared-memory handles that the sending process must still own when the saver opens them. Every role
    but "saver" is a loader (verify runs two); the saver's module is the last of `plugin_modules`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent decides
    # A forked child shares the parent's heap copy-on-write, torch's modules included (hundreds of
    # thousands of objects). A full collection walks them all and writes to each page it visits, so the
    # kernel copies those pages: 0.3-0.5 s of CPU in a 3 s conversion. Frozen, they are left out of every
    # collection; what the child allocates itself is collected as before (even where the parent
    # collects nothing, as the command line's does).
    gc.freeze()
    gc.enable()
    gate = output.CommitGate(gate.value, parent_pid)
    setattr(args, output.COMMIT_GATE, gate)  # the saver's StagedFolder and write_atomically claim it
    stop_on_signals(gate)
    dry_run.enter(getattr(args, "dry_run_scratch", None))  # inherited under fork; set again for spawn
    _die_with_parent(parent_pid)
    _release_freed_tensors()  # inherited under fork; set again for spawn
    protocol.set_event_sink(events.put)
    if role != "saver":
        file_refs.send_by_reference()
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent while it started us
        try:
            modules = [importlib.import_module(name) for name in plugin_modules]
            getattr(modules[-1 if role == "saver" else 0], entry)(queue, args)
        except SystemExit as error:
            if error.code not in (None, 0):
                raise
        if role != "saver":
            queue.put(EXIT)  # harmless after "done"; ends a saver still waiting if the loader never sent it
            saver_finished.wait()
        for number in (signal.SIGTERM, signal.SIGHUP):  # done: a late stop must not print from teardown
            signal.signal(number, signal.SIG_IGN)
    except BaseException as error:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped while reporting: just end, no second error
        except Interrupted:  # stopped just before that: the parent knows why, so end without a traceback
            os._exit(1)
        if DEBUG:
            traceback.print_exc()
        if not isinstance(error, Interrupted):  # the parent stopped us and knows why
            path = error.path if isinstance(error, ConversionError) else getattr(error, "filename", None)
            reports.put((role, *_describe(error), None if path is None else str(path)))
        if role != "saver":
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


def run(args, loader, saver, on_event=None, cancel=None, handle_signals=False, second_loader=None):
    """Run one conversion. Returns when it is done; otherwise raises ConversionError with the side
    that failed first (`role`), `kind` and the exit `status` (1, 3, or 128 + N for signal N).

    `second_loader` ((args, loader module)): verify's second stream, a loader process of role "second
    loader" on a queue of its own; the saver then gets the queues as a tuple (first, second). With no
    args.save_dir (None) nothing is locked or staged; with args.share (a rank of a split job) nothing is locked.

    `on_event(dict)` gets every progress event of both sides, in the parent, in order of arrival;
    `cancel` (a threading.Event) stops the run within a fraction of a second. With `handle_signals`
    (the command line) SIGTERM, SIGINT and SIGHUP stop the run too; the save-dir lock is held throughout."""
    error = _run(args, loader, saver, on_event, cancel, handle_signals, second_loader)
    if error is not None:
        raise error  # raised here, so its traceback keeps no queue alive (spawn's semaphores have names)


def _run(args, loader, saver, on_event, cancel, handle_signals, second_loader=None):
    if handle_signals and threading.current_thread() is not threading.main_thread():
        raise ConversionError("handle_signals=True needs the main thread (Python runs signal handlers only there)",
                              role="arguments")
    if cancel is not None and cancel.is_set():
        return ConversionError("cancelled", kind="interrupted", status=EXIT_CANCELLED)
    previous = {number: signal.signal(number, _raise_interrupted) for number in STOP_SIGNALS} if handle_signals else {}
    try:
        return _locked_run(args, loader, saver, on_event, cancel, second_loader)
    except Interrupted as stop:  # before the run started, or while it tidied up after itself
        return ConversionError(f"interrupted by {stop}", kind="interrupted", status=128 + stop.signum)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _locked_run(args, loader, saver, on_event, cancel, second_loader=None):
    # One rank of a split job (args.share) locks nothing: rank 0's engine holds the lock for the whole
    # job and removes the job's staging itself (converter_core.distributed).
    locking = args.save_dir is not None and not getattr(args, "share", None)
    lock = output.SaveDirLock(args.save_dir) if locking else None
    _release_freed_tensors()
    context = mp.get_context(START_METHOD)
    try:
        reports, events = context.SimpleQueue(), Events(context)
        relay_ends, end_relay = mp.Pipe(duplex=False)  # the parent's own: no child ever holds its write end's lock
        relay = threading.Thread(target=_relay, args=(events.reader, relay_ends, on_event),
                                 name="converter_core events", daemon=True)
        relay.start()
    except (OSError, RuntimeError, MemoryError) as error:  # e.g. no thread or pipe under a low `ulimit -v`
        if lock is not None:
            lock.release()
        raise _cannot_start(error) from None
    processes, gate, said = {}, output.CommitGate(context.Value("b", output.RUNNING)), {}
    stop_signals = [number for number in STOP_SIGNALS if signal.getsignal(number) is _raise_interrupted]
    failure = (None, "did not finish", EXIT_INTERNAL)
    try:
        for path in output.remove_dead_staging(args.save_dir) if lock is not None else ():
            events.put({"event": "note", "message": f"removed {path}: staged by an earlier run into "
                                                    f"{args.save_dir} that did not finish"})
        failure = _start_and_supervise(context, args, loader, saver, reports, said, events, processes, cancel, gate,
                                       second_loader)
    except Interrupted as stop:
        failure = (None, f"interrupted by {stop}", 128 + stop.signum)
    finally:
        for number in stop_signals:  # a second signal must not cut the cleanup short
            signal.signal(number, signal.SIG_IGN)
        for process in processes.values():
            _stop(process)
        if lock is not None and (failure is not None or any(process.exitcode for process in processes.values())):
            output.remove_dead_staging(args.save_dir)  # a child killed outright could not remove its own
        if lock is not None:
            lock.release()
        end_relay.send(None)
        relay.join()
        for end in (events.reader, events.writer, relay_ends, end_relay):
            end.close()
    return None if failure is None else _true_cause(failure, reports, said)


class Events:
    """The children's progress events to the parent: one pipe whose writers take turns under a lock. Only
    children take that lock, so one killed while holding it (SIGKILL in mid-report) can block only the
    other child, which the parent stops anyway, never the parent: it only reads. An event is a few hundred
    bytes, written at once (a pipe write under PIPE_BUF is atomic), so it arrives whole or not at all."""

    def __init__(self, context):
        self.reader, self.writer = context.Pipe(duplex=False)
        self.lock = context.Lock()

    def put(self, event):
        with self.lock:
            self.writer.send(event)


def _cannot_start(error):
    return ConversionError(f"cannot start the loader and saver ({first_line(error)}){memory_hint()}")


def _relay(reader, ends, on_event):
    """Parent thread: hand each child's event to `on_event` until `ends` is signalled (the children are gone
    by then) and nothing is left to read; a failing callback is not the run's failure."""
    while True:
        ready = wait([reader, ends])
        if reader not in ready:
            return
        try:
            event = reader.recv()
        except (EOFError, OSError):
            return
        if on_event is not None:
            try:
                on_event(event)
            except Exception:
                pass


def _start_and_supervise(context, args, loader, saver, reports, said, events, processes, cancel, gate,
                         second_loader=None):
    """Start saver then loader (recorded in `processes` at once, so an interruption stops them) and
    supervise them; returns None or the first failure observed, (role, what was observed, status).
    A stop signal or a cancel that comes once the saver is committing is too late: the run completes."""
    queue = context.Queue(maxsize=args.max_queue_size)
    # (role, its plugin modules in import order, entry, queue, args), the saver first
    sides = [("saver", (loader, saver), "save_checkpoint", queue, args),
             ("loader", (loader, saver), "load_checkpoint", queue, args)]
    if second_loader is not None:
        second_args, second = second_loader
        second_queue = context.Queue(maxsize=second_args.max_queue_size)
        sides[0] = ("saver", (loader, second, saver), "save_checkpoint", (queue, second_queue), args)
        sides.append(("second loader", (second, saver), "load_checkpoint", second_queue, second_args))
    saver_finished = context.Event()
    parent = os.getpid()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a child takes none before its handlers are set
    try:
        for role, modules, entry, side_queue, side_args in sides:
            processes[role] = context.Process(target=_run_side, name=role, args=(
                role, tuple(module.__name__ for module in modules), entry, side_queue, side_args, reports, events,
                saver_finished, parent, gate))
            try:
                processes[role].start()
            except (OSError, RuntimeError, MemoryError) as error:
                del processes[role]
                raise _cannot_start(error) from None
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    sides = {role: processes[role] for role in ("loader", "saver", "second loader") if role in processes}
    stall = getattr(args, "stall_timeout", None) or None
    try:
        failure = _supervise(sides, saver_finished, cancel, stall)
        if failure and failure[1] == "cancelled" and not gate.withdraw():
            failure = _supervise(sides, saver_finished, None, stall)
    except Interrupted:
        if gate.withdraw():
            raise
        for number in STOP_SIGNALS:
            if signal.getsignal(number) is _raise_interrupted:
                signal.signal(number, signal.SIG_IGN)
        failure = _supervise(sides, saver_finished, None, stall)
    loaders = [process for role, process in processes.items() if role != "saver" and process.is_alive()]
    if failure and failure[0] == "saver" and (processes["saver"].exitcode or 0) > 0 and loaders:
        if _read_reports(reports, said).get("saver", ("",))[0] == protocol.LOADER_EXITED:
            # A saver that stopped on a loader's "exit" fails second: let that loader report the cause.
            wait([process.sentinel for process in loaders], LOADER_REPORT_SECONDS)
    return failure


def _read_reports(reports, said):
    """Add the sides' reports that have arrived to `said` ({side: (reason, internal, path)}, the first of each)."""
    while not reports.empty():
        side, reason, internal, path = reports.get()
        said.setdefault(side, (reason, internal, path))
    return said


def _true_cause(failure, reports, said):
    """The ConversionError naming the side that failed first and why: an interruption of the run, else a
    saver that failed first on its own error (the loader, stopped for it in the middle of a read, may then
    report whatever its library made of the stop), else the loader's own error (a saver that stopped on
    the loader's "exit" fails second), else a process killed by a signal, else the saver's error."""
    role, observed, status = failure
    _read_reports(reports, said)
    if role is None:
        return ConversionError(observed, kind="interrupted", status=status)
    saver_first = role == "saver" and "killed" not in observed and said.get("saver", ("",))[0] not in ("", protocol.LOADER_EXITED)
    loaders = [side for side in said if side != "saver"]  # in the order they reported
    if loaders or role in said and "killed" not in observed:
        side = loaders[0] if loaders and not saver_first else role
        reason, internal, path = said[side]
        error = ConversionError(reason, role=side, kind="internal" if internal else "input",
                                status=EXIT_INTERNAL if internal else EXIT_INPUT, path=path)
        error.side_failed = True  # the command line says "<side> failed: <reason>"
        return error
    return ConversionError(observed, role=role, kind="input", status=status)


def _supervise(processes, saver_finished, cancel=None, stall=None):
    """Wait until both end well (None) or one fails: (role, what was observed, exit status). With `stall`
    (seconds), a side stopped (SIGSTOP) for that long has stalled the run: the queue's own watchdog
    cannot see a side that has taken every message and then stopped."""
    running = dict(processes)
    saver_done_at = None
    stopped_since = {}
    while running:
        ready = wait([p.sentinel for p in running.values()], timeout=POLL_SECONDS)
        if cancel is not None and cancel.is_set():
            return None, "cancelled", EXIT_CANCELLED
        if saver_done_at is not None and time.monotonic() - saver_done_at > GRACE_SECONDS:
            return "loader", "loader did not finish after the saver completed", EXIT_INPUT
        for role, process in running.items() if stall else ():
            if not _is_stopped(process.pid):
                stopped_since.pop(role, None)
            elif time.monotonic() - stopped_since.setdefault(role, time.monotonic()) > stall:
                return role, f"stalled: the {role} has been stopped (SIGSTOP) for {stall:g} s (--stall-timeout)", EXIT_INPUT
        for role, process in list(running.items()):
            if process.sentinel in ready:
                process.join()
                del running[role]
                if role == "saver":
                    saver_finished.set()
                    saver_done_at = time.monotonic()
                if process.exitcode != 0:
                    return role, f"{role} {_ended(process.exitcode)}", EXIT_INPUT
    return None


def _ended(exitcode):
    """How a side that failed ended, in words."""
    if exitcode == -signal.SIGBUS:  # a saver not ours (ours catch it on source pages) reading a cut file
        return ("was killed by SIGBUS (signal 7): a memory-mapped file it read was cut short or changed during "
                "the conversion")
    return f"was killed by signal {-exitcode}" if exitcode < 0 else f"exited with status {exitcode}"


def _is_stopped(pid):
    """Whether process `pid` is stopped by a signal (Linux's /proc; elsewhere never known)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] in (b"T", b"t")
    except (OSError, IndexError):
        return False


def _stop(process):
    if process.is_alive():
        process.terminate()
        try:
            os.kill(process.pid, signal.SIGCONT)  # a stopped side runs its cleanup (removing its staging) too
        except OSError:
            pass
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
