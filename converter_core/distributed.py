"""Scale-out: one conversion split over the ranks of torch.distributed, started by torchrun or locally
(--processes K). Every rank runs the ordinary loader -> saver pipeline (orchestrator.run) with a
share.Share on its args, so its saver writes only the output files that rank owns. Rank 0 holds the
--save-dir lock; once every rank's saver has succeeded it calls the saver's finish_share, which writes
the rest and commits.

The engine is torch's: a TCPStore (the ranks' arrival, heartbeats, the first cause of a failure, the
ranks' progress events for rank 0) and a gloo group for the collectives (the job id, the pieces). A
collective runs only once the store shows every rank has arrived at it, so none waits on a dead peer.
All or nothing: a rank that fails, is killed, stops responding or is stopped by a signal ends every
rank within seconds; each removes the job's staged output once its own children have stopped, and
the job's one error line names that rank and its first cause."""

import argparse
import dataclasses
import datetime
import json
import os
import secrets
import shutil
import signal
import socket
import string
import sys
import tempfile
import threading
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from converter_core import orchestrator, output, share as sharing
from converter_core.errors import EXIT_INPUT, ConversionError, Interrupted

BEAT_SECONDS = 0.5       # each rank adds 1 to its heartbeat counter this often
STALE_SECONDS = 4.0      # a peer whose counter has not moved for this long (by our own clock) is gone
POLL_SECONDS = 0.1
MEET_SECONDS = 120       # for every rank to reach the store (spawned local ranks import torch first)
COLLECTIVE_SECONDS = 60  # a gloo collective, entered only once every rank is there
GRACE_SECONDS = 10       # rank 0 (--processes) waits this long for a local rank to end before killing it
OPERATION_SECONDS = 10   # one store operation, once every rank is there
STOP_SIGNALS = orchestrator.STOP_SIGNALS
JOB_LETTERS = string.ascii_lowercase + string.digits
COMMITTED = {"committed": True}
LOCAL_PREFIX = "converter_core/local/"


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this rank meets the others: the store at host:port (hosted by rank 0 unless `agent_store`:
    torchrun's agent hosts it and every rank is a client), under `prefix`."""
    rank: int
    world: int
    host: str
    port: int
    agent_store: bool = False
    prefix: str = "converter_core/"
    local: bool = False    # --processes: rank 0 is the caller, the others its children


def torchrun_launch():
    """This process's Launch when torchrun started it in a world of more than one rank, else None."""
    env = os.environ
    try:
        rank, world, port = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["MASTER_PORT"])
    except (KeyError, ValueError):
        return None
    if world <= 1:
        return None
    attempt = f"{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return Launch(rank, world, env.get("MASTER_ADDR", "127.0.0.1"), port,
                  env.get("TORCHELASTIC_USE_AGENT_STORE") == "True", f"converter_core/{attempt}/")


def world_size(args, torchrun=False):
    """The ranks a conversion runs on: torchrun's world (`torchrun`: the command line), else --processes."""
    launch = torchrun_launch() if torchrun else None
    processes = getattr(args, "processes", 1) or 1
    if launch is not None and processes > 1:
        raise ConversionError("--processes: torchrun already started this process as one of its ranks; "
                              "leave --processes out (torchrun's --nproc-per-node says how many)", role="arguments")
    return launch.world if launch is not None else processes


def run(args, loader, saver, on_event=None, cancel=None, handle_signals=False, torchrun=False):
    """One conversion over world_size() ranks; one rank is orchestrator.run, unchanged. Returns this
    process's rank (only rank 0 reports the job); raises ConversionError with the job's first cause,
    `.rank` naming the rank it came from and `.quiet` set on a rank that must not print it.

    `on_event`, `cancel` and `handle_signals` are orchestrator.run's; at world > 1 `on_event` gets every
    rank's events (each with "rank") on rank 0, and nothing elsewhere."""
    world = world_size(args, torchrun)
    if world == 1:
        orchestrator.run(args, loader, saver, on_event=on_event, cancel=cancel, handle_signals=handle_signals)
        return 0
    try:
        if not callable(getattr(saver, "finish_share", None)):
            raise ConversionError(f"saver {args.saver} cannot be split over ranks (it has no finish_share); "
                                  "run it in one process", role="arguments")
        if handle_signals and threading.current_thread() is not threading.main_thread():
            raise ConversionError("handle_signals=True needs the main thread (Python runs signal handlers only "
                                  "there)", role="arguments")
    except ConversionError as error:
        raise early_failure(error, torchrun) from None
    launch = torchrun_launch() if torchrun else None
    if launch is None:
        _Rank(args, loader, saver, None, on_event, cancel).run_local(world, handle_signals)
        return 0
    _Rank(args, loader, saver, launch, on_event if launch.rank == 0 else None, cancel).run(handle_signals)
    return launch.rank


def early_failure(error, torchrun=False):
    """A rank of torchrun that failed before the job started (its flags, its folders) still tells the
    others, so they stop at once instead of waiting for it: the error every rank then raises."""
    launch = torchrun_launch() if torchrun else None
    if launch is None:
        return error
    rank = _Rank(None, None, None, launch, None, None)
    try:
        rank.store = rank.connect()
        return rank.job_error(rank.publish(_cause(launch.rank, error)))
    except dist.DistError:
        return rank.job_error(_cause(launch.rank, error))


def _cause(rank, error):
    """A failure as the store holds it: {rank, message (the job's line), role, kind, status, path}."""
    if isinstance(error, Interrupted):
        return dict(rank=rank, message=f"rank {rank} interrupted by {error}", role=None, kind="interrupted",
                    status=128 + error.signum, path=None)
    if isinstance(error, ConversionError):
        return dict(rank=rank, message=f"rank {rank} failed: {error.line()}", role=error.role, kind=error.kind,
                    status=error.status, path=error.path)
    line, internal = orchestrator._describe(error)
    return dict(rank=rank, message=f"rank {rank} failed: {line}", role=None, kind="internal" if internal else "input",
                status=orchestrator.EXIT_INTERNAL if internal else EXIT_INPUT, path=None)


def _lost(rank, why):
    return dict(rank=rank, message=f"rank {rank} {why}", role=None, kind="input", status=EXIT_INPUT, path=None,
                lost=True)


class _Stopped(Exception):
    """This rank's run was stopped: the cause is in _Rank.cause or in the store."""


class _Rank:
    """One rank of a job: meet, plan (rank 0), convert, finish, and the watcher thread that beats,
    watches the others and forwards events."""

    def __init__(self, args, loader, saver, launch, on_event, cancel):
        self.args, self.loader, self.saver, self.launch = args, loader, saver, launch
        self.on_event, self.cancel = on_event, cancel
        self.stop, self.quit = threading.Event(), threading.Event()
        self.cause = None          # this rank's own cause of a stop (a signal, a lost peer, a cancel)
        self.sigterm = None        # torchrun's SIGTERM, which may only be its agent passing on a peer's death
        self.published = None      # the job's first cause, once known
        self.committing = False    # rank 0 in finish_share: a stop signal raises (unless too late)
        self.store = self.watcher = self.receiver = self.listen_fd = None
        self.children = {}         # --processes, on rank 0: {rank: process}
        self.neighbours = {}       # the other ranks on this machine: {rank: pid}, watched beside the heartbeats
        self.pending, self.pending_lock = [], threading.Lock()
        self.deliver_lock = threading.Lock()
        self.publish_lock, self.receive_lock = threading.Lock(), threading.Lock()

    # -- the store ------------------------------------------------------------------------------
    def connect(self, listen_fd=None):
        """A client of the store, or on rank 0 its host (unless torchrun's agent hosts it); under
        --processes rank 0 hosts it on `listen_fd`, a socket bound before the other ranks started."""
        launch = self.launch
        hosting = launch.rank == 0 and not launch.agent_store
        store = dist.TCPStore(launch.host, launch.port, None, hosting, datetime.timedelta(seconds=MEET_SECONDS),
                              wait_for_workers=False, master_listen_fd=listen_fd if hosting else None,
                              multi_tenant=hosting and listen_fd is None)
        return dist.PrefixStore(launch.prefix, store)

    def publish(self, cause, store=None):
        """Set the job's first cause unless one is set (once, whoever comes first); returns the first."""
        with self.publish_lock:
            if self.published is None:
                self.published = json.loads((store or self.store).compare_set("abort", "", json.dumps(cause)))
            return self.published

    def first_cause(self):
        if self.published is None and self.store is not None and self.store.check(["abort"]):
            self.published = json.loads(self.store.get("abort"))
        return self.published

    def job_error(self, cause):
        """The ConversionError this rank raises for the job's first cause. Rank 0 says it; another rank
        only when rank 0 is the one lost (the first such rank to claim it), and never under --processes."""
        error = ConversionError(cause["message"], role=cause.get("role"), kind=cause.get("kind", "input"),
                                status=cause.get("status") or EXIT_INPUT, path=cause.get("path"))
        error.rank = cause["rank"]
        rank = self.launch.rank
        error.quiet = rank != 0
        if self.launch.local or rank == 0:
            return error
        if cause.get("alone"):
            error.quiet = cause["rank"] != rank
        elif cause["rank"] == 0 and cause.get("lost"):  # rank 0 cannot say it: the first other rank to claim it
            try:
                error.quiet = self.store.compare_set("said", "", str(rank)) != str(rank).encode()
            except dist.DistError:
                error.quiet = False
        return error

    def wait_for(self, keys, seconds=None):
        """Until every key is in the store; a stop, a cause in the store or a local rank ending ends the
        wait, and so do `seconds` (then the first rank whose key is missing is lost)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.store.check(keys):
            self.check_local()
            if deadline is not None and time.monotonic() > deadline and self.cause is None:
                missing = next(key for key in keys if not self.store.check([key]))
                self.stop_for(_lost(int(missing.rpartition("/")[2]), f"never arrived (waited {seconds:g} s)"))
            if self.stop.wait(POLL_SECONDS) or self.store.check(["abort"]):
                raise _Stopped()

    def check_local(self):
        """The caller's cancel; under --processes (rank 0) a rank that ended before the job did is lost
        (its own cause, if it could say one, is in the store first)."""
        if self.cancel is not None and self.cancel.is_set() and not self.stop.is_set():
            self.stop_for(dict(rank=self.launch.rank, message="cancelled", role=None, kind="interrupted",
                               status=orchestrator.EXIT_CANCELLED, path=None))
        for r, process in self.children.items():
            if process.exitcode not in (None, 0) and self.cause is None:
                self.stop_for(_lost(r, orchestrator._ended(process.exitcode)))
        for r, pid in self.neighbours.items():
            if not _alive(pid) and self.cause is None:
                self.stop_for(_lost(r, "is gone (its process ended without a word: killed, or out of memory)"))

    # -- stopping ---------------------------------------------------------------------------------
    def stop_for(self, cause):
        if self.cause is None and cause is not None:
            self.cause = cause
        self.stop.set()

    def on_signal(self, signum, frame):
        if self.published is COMMITTED:
            return
        if self.committing:
            if not output.defer_signal(signum, self.gate):  # too late once the commit is claimed: the job completes
                raise Interrupted(signum)
            return
        if signum == signal.SIGTERM and not self.launch.local and self.cause is None:
            self.sigterm = (_cause(self.launch.rank, Interrupted(signum)), time.monotonic())
            self.stop.set()  # the cause waits a moment: torchrun's agent sends SIGTERM when a peer has died
            return
        self.stop_for(_cause(self.launch.rank, Interrupted(signum)))

    # -- the watcher thread -------------------------------------------------------------------------
    def watch(self):
        rank, world = self.launch.rank, self.launch.world
        store = self.store.clone()
        store.set_timeout(datetime.timedelta(seconds=STALE_SECONDS))  # a store that hangs is lost too
        others = [r for r in range(world) if r != rank]
        seen = {r: (None, time.monotonic()) for r in others}
        while not self.quit.wait(BEAT_SECONDS):
            try:
                store.add(f"beat/{rank}", 1)
                self.flush(store)
                if self.cause is not None and not self.committing:  # a failed commit says its own cause
                    self.publish(self.cause, store)
                if store.check(["abort"]):
                    self.stop_for(None)
                values = store.multi_get([f"beat/{r}" for r in others])
            except dist.DistError as error:
                self.stop_for(self.unreachable(error))
                return
            now = time.monotonic()
            for r, value in zip(others, values):
                if value != seen[r][0]:
                    seen[r] = (value, now)
                elif now - seen[r][1] > STALE_SECONDS and self.cause is None:
                    self.stop_for(_lost(r, f"stopped responding (no heartbeat for {STALE_SECONDS:g} s)"))
            self.check_local()

    # -- events -----------------------------------------------------------------------------------
    def forward(self, event):
        """Orchestrator's on_event on every rank: rank 0's go to on_event, the others' to rank 0."""
        event = dict(event, rank=self.launch.rank)
        if self.launch.rank == 0:
            self.deliver(event)
        else:
            with self.pending_lock:
                self.pending.append(event)

    def flush(self, store):
        with self.pending_lock:
            if self.pending:
                store.queue_push("events", json.dumps(self.pending, default=str))
                self.pending = []

    def receiving(self):
        """Rank 0's thread for the other ranks' events: apart from the heartbeats, so that a slow
        `on_event` (a display whose reader lags) never makes rank 0 look lost."""
        store = self.store.clone()
        try:
            while not self.quit.wait(BEAT_SECONDS / 2):
                self.receive(store)
        except dist.DistError:
            pass  # the watcher says so

    def receive(self, store):
        """Rank 0: the other ranks' events, in the order each sent them."""
        with self.receive_lock:
            while store.queue_len("events"):
                for event in json.loads(store.queue_pop("events", False)):
                    self.deliver(event)

    def deliver(self, event):
        if self.on_event is not None:
            with self.deliver_lock:
                self.on_event(event)

    # -- the job ------------------------------------------------------------------------------------
    def run(self, handle_signals):
        previous = {number: signal.signal(number, self.on_signal) for number in STOP_SIGNALS} if handle_signals else {}
        try:
            self.job()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def job(self):
        rank, world = self.launch.rank, self.launch.world
        lock = job = pieces_folder = None
        try:
            try:
                self.store = self.meet()
                plan = [None]
                if rank == 0:
                    try:
                        lock = output.SaveDirLock(self.args.save_dir)
                        for path in output.remove_dead_staging(self.args.save_dir):  # before any rank stages
                            self.deliver(dict(event="note", rank=0, message=f"removed {path}: staged by an earlier "
                                              f"run into {self.args.save_dir} that did not finish"))
                        plan = [dict(job="".join(secrets.choice(JOB_LETTERS) for _ in range(8)))]
                    except ConversionError as error:
                        plan = [dict(cause=_cause(0, error))]
                self.collective(dist.broadcast_object_list, plan, src=0)
                if "cause" in plan[0]:
                    self.published = plan[0]["cause"]
                    raise _Stopped()
                job = plan[0]["job"]
                self.watcher = threading.Thread(target=self.watch, name="converter_core ranks", daemon=True)
                self.watcher.start()
                if rank == 0:
                    self.receiver = threading.Thread(target=self.receiving, name="converter_core rank events",
                                                     daemon=True)
                    self.receiver.start()
                pieces_folder = tempfile.mkdtemp(prefix="converter_core-pieces-")
                args = argparse.Namespace(**vars(self.args))
                args.share = sharing.Share(rank, world, job, os.path.join(pieces_folder, "pieces.json"))
                orchestrator.run(args, self.loader, self.saver, on_event=self.forward, cancel=self.stop)
                self.flush(self.store)  # this rank's last events reach rank 0 before it counts as finished
                self.store.set(f"finished/{rank}", "")
                self.wait_for([f"finished/{r}" for r in range(world)])
                path = args.share.pieces_file
                every = [None] * world if rank == 0 else None
                self.collective(dist.gather_object, sharing.read_pieces(path) if os.path.exists(path) else None,
                                every, dst=0)
                if rank == 0:
                    self.receive(self.store)
                    self.commit(args, every)
                    self.store.set("outcome", "committed")
                    self.wait_a_moment_for([f"left/{r}" for r in range(1, world)])
                else:
                    self.wait_for(["outcome"])
                    self.published = COMMITTED
                    self.store.set(f"left/{rank}", "")
                return
            except _Stopped:
                pass
            except dist.DistError as error:  # the store is gone (rank 0's, under --processes), or unreachable
                if not self.stop.is_set():
                    self.stop_for(self.unreachable(error))
            except (Exception, Interrupted) as error:  # its own run or a saver's finish_share failed
                if not self.stop.is_set():
                    self.check_local()  # a rank here that died first (its staged files gone with it) is the cause
                    self.stop_for(_cause(rank, error))
            if self.published is COMMITTED:  # what failed after the commit (a rank leaving) changes nothing
                return
            self.stop.set()
            raise self.job_error(self.settle())
        finally:
            self.quit.set()
            for thread in (self.watcher, self.receiver):
                if thread is not None:
                    thread.join()
            failed = self.published is not COMMITTED
            if failed and job is not None:
                output.remove_job_staging(self.args.save_dir, job)
            if self.children:
                self.end_children(failed)
            if lock is not None:
                lock.release()
            if pieces_folder is not None:
                shutil.rmtree(pieces_folder, ignore_errors=True)
            if dist.is_initialized():
                dist.destroy_process_group()

    def meet(self):
        """Connect to the store, say this rank is here, wait for the others, start the gloo group."""
        rank, world = self.launch.rank, self.launch.world
        listen_fd, self.listen_fd = self.listen_fd, None  # the store owns it from here
        store = self.connect(listen_fd=listen_fd)
        self.store = store
        store.add(f"beat/{rank}", 1)  # every beat key exists before anyone watches them
        store.set(f"here/{rank}", json.dumps([socket.gethostname(), os.getpid()]))
        self.wait_for([f"here/{r}" for r in range(world)], MEET_SECONDS)
        here = socket.gethostname()
        for r, value in enumerate(store.multi_get([f"here/{r}" for r in range(world)])):
            host, pid = json.loads(value)
            if host == here and r != rank and not self.launch.local:  # --processes: rank 0 sees its children end
                self.neighbours[r] = pid
        store.set_timeout(datetime.timedelta(seconds=OPERATION_SECONDS))
        dist.init_process_group("gloo", store=dist.PrefixStore("gloo/", store), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_SECONDS))
        return store

    def collective(self, function, *args, **kwargs):
        """A gloo collective, entered once every rank has arrived at it. One that fails (a peer went in
        the meantime) leaves the watcher a moment to say which peer before this rank blames itself."""
        try:
            function(*args, **kwargs)
        except RuntimeError as error:
            if self.watcher is not None and self.stop.wait(STALE_SECONDS + 2 * BEAT_SECONDS):
                raise _Stopped() from None
            raise ConversionError(f"the ranks' gloo group failed ({_first_words(error)})") from None

    def unreachable(self, error):
        """This rank lost the store: it cannot coordinate, so it says so itself."""
        return dict(rank=self.launch.rank, message=f"rank {self.launch.rank} cannot reach the job's store at "
                    f"{self.launch.host}:{self.launch.port} ({_first_words(error)})", role=None, kind="input",
                    status=EXIT_INPUT, path=None, alone=True)

    def settle(self):
        """The job's first cause, after this rank's run stopped: its own, or the one in the store. After
        torchrun's SIGTERM, the peer whose death made the agent send it, if the store or the heartbeats
        say so within a heartbeat's staleness; else the SIGTERM."""
        try:
            if self.sigterm is not None and self.cause is None and self.watcher is not None:
                deadline = self.sigterm[1] + STALE_SECONDS + 2 * BEAT_SECONDS
                while self.cause is None and self.first_cause() is None and time.monotonic() < deadline:
                    time.sleep(POLL_SECONDS)
            if self.sigterm is not None:
                self.stop_for(self.sigterm[0])
            if self.cause is not None and self.store is not None:
                return self.publish(self.cause)
            first = self.first_cause()
            if first is not None:
                return first
        except dist.DistError:
            pass
        return self.cause or self.published or _lost(0, "stopped responding (the job's store is gone)")

    def commit(self, args, pieces):
        """Rank 0, every rank's saver done: the saver's finish_share writes the rest and commits. A stop
        signal raises in it until the commit is claimed (then the job completes); a cancel before it counts."""
        self.gate = output.CommitGate(mp.get_context(orchestrator.START_METHOD).Value("b", output.RUNNING))
        self.committing = True  # from here the watcher publishes no cause: this thread says the outcome
        try:
            if self.stop.is_set():
                raise _Stopped()
            setattr(args, output.COMMIT_GATE, self.gate)  # claimed by the saver's staged folder and tracker
            self.saver.finish_share(args, pieces)
            self.published = COMMITTED
        finally:
            self.committing = False

    def wait_a_moment_for(self, keys):
        """Rank 0 after the commit: the others have read it before the store (ours, under --processes) goes."""
        deadline = time.monotonic() + STALE_SECONDS
        try:
            while not self.store.check(keys) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        except dist.DistError:
            pass

    # -- --processes: rank 0 here, the others spawned ------------------------------------------------
    def run_local(self, world, handle_signals):
        listener = socket.create_server(("127.0.0.1", 0))
        self.launch = Launch(0, world, "127.0.0.1", listener.getsockname()[1], prefix=LOCAL_PREFIX, local=True)
        self.listen_fd = listener.detach()  # bound before the ranks start, so no other process can take the port
        context = mp.get_context(orchestrator.START_METHOD)
        inherited = self.listen_fd if context.get_start_method() == "fork" else None  # the child closes it
        sys.stdout.flush()  # nothing buffered is printed twice by a forked rank
        sys.stderr.flush()
        try:
            try:
                for rank in range(1, world):
                    self.children[rank] = context.Process(
                        target=_local_rank, name=f"converter_core rank {rank}",
                        args=(dataclasses.replace(self.launch, rank=rank), self.args, self.loader.__name__,
                              self.saver.__name__, os.getpid(), inherited))
                    self.children[rank].start()
            except (OSError, RuntimeError, MemoryError) as error:
                self.children.pop(rank, None)
                for process in self.children.values():
                    orchestrator._stop(process)
                raise orchestrator._cannot_start(error) from None
            self.run(handle_signals)
        finally:
            if self.listen_fd is not None:  # never handed to the store
                os.close(self.listen_fd)

    def end_children(self, failed):
        """--processes, rank 0: wait for the other ranks to end (after a failure each stops on its own, a
        stopped one once continued), then stop any that has not."""
        for process in self.children.values() if failed else ():
            try:
                os.kill(process.pid, signal.SIGCONT)
            except OSError:
                pass
        deadline = time.monotonic() + (GRACE_SECONDS if failed else STALE_SECONDS)
        for process in self.children.values():
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.children.values():
            orchestrator._stop(process)


def _local_rank(launch, args, loader, saver, parent, listen_fd):
    """A rank --processes started: stops with its parent (rank 0), ignores Ctrl-C (rank 0 decides),
    prints nothing (rank 0 reports the job) and exits with the job's status."""
    import importlib
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if listen_fd is not None:
        os.close(listen_fd)  # inherited under fork: only rank 0 may hold the store's socket
    orchestrator._die_with_parent(parent)
    modules = [importlib.import_module(name) for name in (loader, saver)]
    rank = _Rank(args, modules[0], modules[1], launch, None, None)
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, rank.on_signal)
    try:
        rank.job()
        status = 0
    except ConversionError as error:
        status = error.status or EXIT_INPUT
    except BaseException:
        status = orchestrator.EXIT_INTERNAL
    os._exit(status)


def _alive(pid):
    """Whether process `pid` runs (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True


def _first_words(error):
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
