"""The fault matrix, through the real command line.

Outputs and processes: collisions on one --save-dir, planted files, signals to the parent, killed
children, stalls, full and read-only disks. Untrusted input: paths that leave the source folder, DCP
chunks out of bounds or covering a tensor twice, integer dtypes relabelled as weights, FIFOs and devices
in place of files, oversized or deeply nested JSON, config counts that are not positive integers or do
not match the weights; more shards than open files; files too large.

Each case asserts one `converter_core: error:` line, a non-zero exit, nothing marked complete, the
source untouched, no process of the run left (nor a /dev/shm entry), and (for interruptions and
collisions) that the same command then succeeds. Nothing asserts on time: a run that must be mid-layer
is held there by a gate the test opens, and a hang is ended by a generous timeout. docs/reliability.md says what is promised."""

import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import BASE, assert_bit_identical, convert, error_line, make_hf_model
from test_cli_and_plugins import plugin_env

# Wraps one of our savers: on each transformer layer it appends "<pid> <layer>" to <save-dir>.progress,
# says so in a note event (a test reading `--progress json` knows the run is mid-layer the moment it is),
# then waits --slow-seconds. With --slow-gate FIFO it first writes a byte into FIFO.ready (it is at the gate;
# its note is sent) and waits, at the first layer, until the test writes a byte into FIFO: however long that
# takes, and for ever if the test never does.
SLOW_SAVER = '''
import importlib, os, time
from converter_core import protocol

def add_arguments(parser):
    importlib.import_module("converter_plugins.saver_" + os.environ["SLOW_SAVER"]).add_arguments(parser)
    parser.add_argument("--slow-seconds", type=float, default=0.5)
    parser.add_argument("--slow-gate", default=None)

class Slow:
    def __init__(self, queue, marker, seconds, gate=None):
        self.queue, self.marker, self.seconds, self.gate = queue, marker, seconds, gate
    def get(self, *a, **k):
        value = self.queue.get(*a, **k)
        if isinstance(value, dict) and value.get("name", "").startswith("transformer layer"):
            with open(self.marker, "a") as handle:
                handle.write(f"{os.getpid()} {value['name']}\\n")
            protocol.report("note", message=f"slow saver {os.getpid()} took {value['name']}")
            if self.gate:
                with open(self.gate + ".ready", "wb", buffering=0) as ready:
                    ready.write(b"r")
                with open(self.gate, "rb", buffering=0) as gate:
                    gate.read(1)
                self.gate = None
            time.sleep(self.seconds)
        return value

def save_checkpoint(queue, args):
    saver = importlib.import_module("converter_plugins.saver_" + os.environ["SLOW_SAVER"])
    saver.save_checkpoint(Slow(queue, args.save_dir + ".progress", args.slow_seconds, args.slow_gate), args)
'''

LAYERS = 8


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    """Every case here, however it ends: no process whose command line names the test's folder (a run's
    parent, loader or saver) outlives it, and /dev/shm gains no entry."""
    shared_memory = set(os.listdir("/dev/shm"))
    yield
    left = processes_naming(tmp_path)
    assert not left, f"processes left behind: {[p.info['cmdline'] for p in left]}"
    assert set(os.listdir("/dev/shm")) <= shared_memory, set(os.listdir("/dev/shm")) - shared_memory


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "hf"
    make_hf_model(folder, num_hidden_layers=LAYERS)
    return folder


def command(source, target, saver="mcore", *flags):
    loader = "llama_hf" if Path(source).joinpath("config.json").exists() else "mcore"
    return [sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", loader, "--saver", saver,
            "--load-dir", str(source), "--save-dir", str(target), *map(str, flags)]


def slow_env(tmp_path, saver):
    env = plugin_env(tmp_path, saver_slow=SLOW_SAVER)
    env["SLOW_SAVER"] = saver
    return env


def start_slow(tmp_path, source, target, saver="mcore", seconds=0.5, gated=False):
    """Start a slow conversion and return it (and its processes) the moment its saver has taken the first
    layer: the saver's note says so on `--progress json`. `gated`: the saver then waits at that layer
    until open_gate(process), for ever if nobody does; this returns once it waits there (its ready byte)."""
    flags = ["--slow-seconds", seconds, "--progress", "json"]
    if gated:
        gate = tmp_path / "gate"
        os.mkfifo(gate)
        os.mkfifo(f"{gate}.ready")
        gate_fd = os.open(gate, os.O_RDWR)  # so the saver's open never waits; its read waits for a byte
        ready_fd = os.open(f"{gate}.ready", os.O_RDWR | os.O_NONBLOCK)
        flags += ["--slow-gate", gate]
    process = subprocess.Popen(command(source, target, "slow", *flags), env=slow_env(tmp_path, saver),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    if gated:
        process.gate = gate_fd
        weakref.finalize(process, os.close, gate_fd)
        weakref.finalize(process, os.close, ready_fd)
    hang_guard = threading.Timer(120, process.kill)  # only ends a run that hangs before it says anything
    hang_guard.start()
    try:
        for line in process.stdout:
            event = json.loads(line) if line.startswith("{") else {}
            if event.get("event") == "note" and event["message"].startswith("slow saver "):
                break
        else:
            pytest.fail(f"the conversion never started writing: {finish(process).stderr[-3000:]}")
        if gated:  # a generous timeout, only against a hang
            assert select.select([ready_fd], [], [], 120)[0], "the slow saver never reached its gate"
            assert os.read(ready_fd, 1) == b"r"
    finally:
        hang_guard.cancel()
    return process, psutil.Process(process.pid).children(recursive=True)


def open_gate(process):
    """Let a gated slow saver go on."""
    os.write(process.gate, b"x")


def layers_taken(target):
    """The layers the slow saver has taken, in order (its .progress marker)."""
    return [line.split(" ", 1)[1] for line in Path(str(target) + ".progress").read_text().splitlines()]


def assert_nothing_complete(target):
    """No tracker, no config.json, no staged or final output anywhere around `target`."""
    target = Path(target)
    if target.exists():
        assert not list(target.rglob("latest_checkpointed_iteration.txt")) and not list(target.rglob("config.json"))
        assert not list(target.rglob("iter_*"))
    assert not [p for p in target.parent.iterdir() if ".partial" in p.name], list(target.parent.iterdir())


def assert_gone(processes, seconds=30, shared_memory_before=None):
    """Every process of the run ends (`seconds` only ends a wait for one that never does), and no /dev/shm
    segment is left behind."""
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    assert not alive, f"still running: {alive}"
    if shared_memory_before is not None:
        assert set(os.listdir("/dev/shm")) <= shared_memory_before


def finish(process, seconds=30):
    """Wait for a run started by start_slow (a generous timeout, only against a hang: then its processes
    are killed, so a failing test leaves none behind)."""
    try:
        out, err = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("saver", ["mcore", "llama_hf"])
def test_second_run_into_the_same_save_dir_is_refused(tmp_path, source, saver):
    before = snapshot(source)
    target = tmp_path / "out"
    first, _ = start_slow(tmp_path, source, target, saver, seconds=0, gated=True)
    second = subprocess.run(command(source, target, saver), capture_output=True, text=True, timeout=60)
    assert "another conversion is writing there" in error_line(second) and second.returncode == 1
    assert layers_taken(target) == ["transformer layer 0"]  # refused while the first was mid-run
    open_gate(first)
    assert finish(first, 60).returncode == 0  # the first run is unharmed and completes
    if saver == "mcore":
        assert (target / "latest_checkpointed_iteration.txt").read_text() == "1"
        subprocess.run(command(target, tmp_path / "back", "llama_hf"), check=True, capture_output=True, timeout=120)
        assert_bit_identical(source, tmp_path / "back")
    else:
        assert_bit_identical(source, target)
    assert snapshot(source) == before


def test_planted_files_in_the_save_dir_are_never_followed_or_deleted(tmp_path, source):
    target = tmp_path / "out"
    target.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (target / "latest_checkpointed_iteration.txt.partial").symlink_to(victim)
    stale = target / ".iter_0000001.partial"
    stale.mkdir()
    (stale / "someone-elses-file").write_text("theirs")
    (tmp_path / ".out.converter_core.lock").symlink_to(victim)
    process = subprocess.run(command(source, target), capture_output=True, text=True, timeout=120)
    assert "cannot create the --save-dir lock" in error_line(process)
    (tmp_path / ".out.converter_core.lock").unlink()
    subprocess.run(command(source, target), check=True, capture_output=True, timeout=120)
    assert victim.read_text() == "precious" and (stale / "someone-elses-file").read_text() == "theirs"
    assert (target / "latest_checkpointed_iteration.txt").read_text() == "1"


@pytest.mark.parametrize("saver", ["mcore", "llama_hf"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["TERM", "INT", "HUP"])
def test_signal_to_the_parent_stops_everything(tmp_path, source, signum, saver):
    target = tmp_path / "out"
    shared_memory = set(os.listdir("/dev/shm"))
    process, children = start_slow(tmp_path, source, target, saver, gated=True)
    os.kill(process.pid, signum)
    result = finish(process)  # the saver waits at its gate for ever: the run ends only if the signal stops it
    assert result.returncode == 128 + signum
    assert f"interrupted by {signal.Signals(signum).name}" in error_line(result)
    assert_gone(children, shared_memory_before=shared_memory)
    assert_nothing_complete(target)
    os.unlink(str(target) + ".progress")
    subprocess.run(command(source, target, saver), check=True, capture_output=True, timeout=120)


# A side whose stop signal arrives while a weakref callback runs: the Interrupted raised there is swallowed
# by Python, so the side must be stopped again from outside the callback (without it, pause() never ends).
STOP_IN_A_CALLBACK = """
import os, signal, weakref
from converter_core import orchestrator
from converter_core.errors import Interrupted

class Thing:
    pass

def callback(reference):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10 ** 6):  # the handler runs here, inside the callback
        pass

orchestrator.stop_on_signals()
thing = Thing()
reference = weakref.ref(thing, callback)
try:
    del thing
    signal.pause()
except Interrupted as stop:
    print("stopped by", stop)
"""


def test_a_stop_signal_inside_a_weakref_callback_still_stops_the_side():
    result = subprocess.run([sys.executable, "-c", STOP_IN_A_CALLBACK], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "stopped by SIGTERM" and result.returncode == 0
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


# A side whose stop signal arrives while it handles a failure (where it removes its staged output): the
# cleanup finishes, then the stop lands.
STOP_DURING_CLEANUP = """
import os, signal
from converter_core import orchestrator
from converter_core.errors import Interrupted

orchestrator.stop_on_signals()
try:
    try:
        raise ValueError("the loader exited")
    except ValueError:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10 ** 6):  # the handler runs here, inside the except block
            pass
        print("cleaned up")
    signal.pause()
except Interrupted as stop:
    print("stopped by", stop)
"""


def test_a_stop_signal_during_cleanup_lets_it_finish_then_stops_the_side():
    result = subprocess.run([sys.executable, "-c", STOP_DURING_CLEANUP], capture_output=True, text=True, timeout=60)
    assert result.stdout.split("\n")[:2] == ["cleaned up", "stopped by SIGTERM"], (result.stdout, result.stderr)


def test_ctrl_c_to_the_whole_group_is_an_interruption(tmp_path, source):
    target = tmp_path / "out"
    shared_memory = set(os.listdir("/dev/shm"))
    process, children = start_slow(tmp_path, source, target, gated=True)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    result = finish(process)
    assert result.returncode == 130 and "interrupted by SIGINT" in error_line(result)
    assert_gone(children, shared_memory_before=shared_memory)
    assert_nothing_complete(target)


@pytest.mark.parametrize("saver", ["mcore", "llama_hf"])
def test_parent_killed_leaves_nothing(tmp_path, source, saver):
    target = tmp_path / "out"
    shared_memory = set(os.listdir("/dev/shm"))
    process, children = start_slow(tmp_path, source, target, saver, gated=True)
    process.kill()
    process.wait(5)
    assert_gone(children, shared_memory_before=shared_memory)
    assert_nothing_complete(target)
    os.unlink(str(target) + ".progress")
    subprocess.run(command(source, target, saver), check=True, capture_output=True, timeout=120)


@pytest.mark.parametrize("victim", ["loader", "saver"])
def test_a_killed_child_is_named(tmp_path, source, victim):
    target = tmp_path / "out"
    shared_memory = set(os.listdir("/dev/shm"))
    process, children = start_slow(tmp_path, source, target, gated=True)
    saver_pid = int(Path(str(target) + ".progress").read_text().split()[0])
    chosen = [c for c in children if (c.pid == saver_pid) == (victim == "saver")][0]
    chosen.kill()
    result = finish(process)
    assert f"{victim} was killed by signal 9" in error_line(result) and result.returncode == 1
    assert_gone(children, shared_memory_before=shared_memory)
    assert_nothing_complete(target)


# A saver killed outright (SIGKILL: the OOM killer) at the worst moment: while it reports progress, holding
# the lock of the channel that carries events to the parent (found through the event sink's owner, so the
# plugin fails loudly if that lock cannot be found, rather than die without holding it).
KILLED_WHILE_REPORTING = """
import os, signal
from converter_core import protocol

def add_arguments(parser):
    pass

def save_checkpoint(queue, args):
    queue.get()
    channel = protocol._event_sink.__self__
    lock = getattr(channel, "lock", None) or channel._wlock
    lock.acquire()  # as in the middle of a report
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_child_killed_while_reporting_progress_is_named(pristine, tmp_path):
    result = subprocess.run(command(pristine / "hf", tmp_path / "out", "dying"), capture_output=True, text=True,
                            timeout=20, env=plugin_env(tmp_path, saver_dying=KILLED_WHILE_REPORTING))
    assert "saver was killed by signal 9" in error_line(result) and result.returncode == 1
    assert_nothing_complete(tmp_path / "out")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("saver,flags", [("mcore", []), ("mcore", ["--ckpt-format", "torch_dist"]), ("llama_hf", [])],
                         ids=["ranks", "torch_dist", "hf"])
def test_disk_full(tmp_path, source, small_disk, saver, flags):
    target = small_disk / "out"
    result = subprocess.run(command(source, target, saver, *flags), capture_output=True, text=True, timeout=120)
    line = error_line(result)
    assert str(small_disk) in line and ("No space left on device" in line or "no space left" in line), line
    assert_nothing_complete(target)
    assert not list(small_disk.iterdir())  # all staged bytes removed again


def test_read_only_output(tmp_path, source, small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = subprocess.run(command(source, small_disk / "out"), capture_output=True, text=True, timeout=120)
    assert "Read-only file system" in error_line(result) and result.returncode == 1


STALLING_LOADER = '''
import threading
from converter_plugins import loader_llama_hf

def add_arguments(parser):
    loader_llama_hf.add_arguments(parser)

class StallAfterMetadata:
    def __init__(self, queue):
        self.queue = queue
    def put(self, value, *args, **kwargs):
        if isinstance(value, dict):
            threading.Event().wait()  # a read that never returns (a hung network mount)
        self.queue.put(value, *args, **kwargs)

def load_checkpoint(queue, args):
    loader_llama_hf.load_checkpoint(StallAfterMetadata(queue), args)
'''

STALLING_SAVER = '''
import threading

def add_arguments(parser):
    pass

def save_checkpoint(queue, args):
    queue.get()
    threading.Event().wait()  # never reads again
'''


@pytest.mark.parametrize("stalled", ["loader", "saver"])
def test_a_stalled_side_ends_the_run(tmp_path, source, stalled):
    env = plugin_env(tmp_path, loader_stalling=STALLING_LOADER, saver_stalling=STALLING_SAVER)
    loader, saver = ("stalling", "mcore") if stalled == "loader" else ("llama_hf", "stalling")
    result = subprocess.run([sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", loader,
                             "--saver", saver, "--load-dir", str(source), "--save-dir", str(tmp_path / "out"),
                             "--stall-timeout", "2", "--max-queue-size", "1"], capture_output=True, text=True,
                            timeout=60, env=env)
    expected = {"loader": "saver failed: stalled: no message from the loader for 2 s",
                "saver": "loader failed: stalled: the saver took no message for 2 s"}[stalled]
    assert expected in error_line(result) and result.returncode == 1
    assert_nothing_complete(tmp_path / "out")


def test_stall_timeout_zero_waits_for_ever(pristine, tmp_path):
    """--stall-timeout 0 waits as long as the other side takes, as convert.py does: a saver that naps a
    second on each layer, behind a queue of one message (so the loader waits on it), still completes."""
    result = subprocess.run(command(pristine / "hf", tmp_path / "out", "slow", "--slow-seconds", 1,
                                    "--stall-timeout", 0, "--max-queue-size", 1),
                            env=slow_env(tmp_path, "mcore"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert layers_taken(tmp_path / "out") == [f"transformer layer {i}" for i in range(TINY["num_hidden_layers"])]
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_bad_stall_timeout_is_refused(tmp_path, source):
    result = subprocess.run(command(source, tmp_path / "out") + ["--stall-timeout", "soon"], capture_output=True,
                            text=True, timeout=60)
    assert "argument --stall-timeout: must be a number of seconds, got 'soon'" in error_line(result)
    assert result.returncode == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["file", "symlink", "not-empty"])
def test_unusable_save_dir_is_refused_untouched(tmp_path, source, case):
    target = tmp_path / "out"
    if case == "file":
        target.write_text("a file")
    elif case == "symlink":
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    result = subprocess.run(command(source, target, "llama_hf"), capture_output=True, text=True, timeout=60)
    expected = {"file": "exists and is not a folder", "symlink": "is a symbolic link",
                "not-empty": "already exists and is not empty"}[case]
    assert expected in error_line(result) and result.returncode == 1
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [target, *([tmp_path / "elsewhere"] if case == "symlink" else [])])


def recording_fsync_and_rename(monkeypatch):
    """Record, in order, every os.fsync (as the path of the descriptor) and os.replace of this process."""
    calls, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target, *args, **kwargs):
        calls.append(("rename", os.path.realpath(source), os.path.realpath(target)))
        real_replace(source, target, *args, **kwargs)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


# Wraps one of our savers: the run's owner withdraws it (a cancel) just before the saver's staged output
# would appear, so the commit gate the orchestrator put on the args must refuse it.
WITHDRAWN_SAVER = '''
import importlib, os
from converter_core import output

saver = importlib.import_module("converter_plugins.saver_" + os.environ["WITHDRAWN_SAVER"])
add_arguments = saver.add_arguments
commit = output.StagedFolder.commit

def withdrawn_first(folder):
    assert folder.gate is not None, "staged without the run's commit gate"
    assert folder.gate.withdraw()
    commit(folder)

def save_checkpoint(queue, args):
    output.StagedFolder.commit = withdrawn_first
    saver.save_checkpoint(queue, args)

def finish_share(args, pieces):
    output.StagedFolder.commit = withdrawn_first
    saver.finish_share(args, pieces)
'''


@pytest.mark.parametrize("saver,flags", [("mcore", ()), ("mcore", ("--ckpt-format", "torch_dist")), ("hf", ()),
                                         ("mcore", ("--processes", "2"))])
def test_a_run_withdrawn_just_before_its_commit_never_appears(tmp_path, source, saver, flags):
    """Each saver stages under the run's commit gate (one process, or a job's finisher), so a cancel that
    wins the race against the commit leaves nothing: one line, nothing complete."""
    env = plugin_env(tmp_path, saver_withdrawn=WITHDRAWN_SAVER)
    env["WITHDRAWN_SAVER"] = saver
    target = tmp_path / "out"
    process = subprocess.run(command(source, target, "withdrawn", *flags), capture_output=True, text=True,
                             timeout=240, env=env)
    line = error_line(process)
    assert str(target) in line and line.endswith(": the run was cancelled; output not committed"), line
    assert_nothing_complete(target)


def test_staged_output_is_on_disk_before_it_appears(tmp_path, monkeypatch):
    """Every file and folder of a staged output is fsynced before the rename that makes it appear, and the
    folder above it after; a file written atomically (the tracker) is fsynced before its rename too."""
    from converter_core import output
    calls = recording_fsync_and_rename(monkeypatch)
    root = Path(os.path.realpath(tmp_path))
    staged = output.StagedFolder(root / "out")
    (staged.path / "iter_0000001" / "mp_rank_00").mkdir(parents=True)
    (staged.path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"weights")
    (staged.path / "iter_0000001" / "common.pt").write_bytes(b"common")
    entries = {str(staged.path)} | {str(path) for path in staged.path.rglob("*")}
    staged.commit()
    renames = [i for i, call in enumerate(calls) if call[:2] == ("rename", str(staged.path))]
    assert len(renames) == 1 and calls[renames[0]][2] == str(root / "out"), calls
    synced_before = {call[1] for call in calls[:renames[0]] if call[0] == "fsync"}
    assert entries <= synced_before, f"not on disk before the rename: {sorted(entries - synced_before)}"
    assert ("fsync", str(root)) in calls[renames[0]:], calls

    calls.clear()
    tracker = root / "out" / "latest_checkpointed_iteration.txt"
    output.write_atomically(tracker, "1")
    renames = [i for i, call in enumerate(calls) if call[0] == "rename" and call[2] == str(tracker)]
    assert len(renames) == 1 and tracker.read_text() == "1", calls
    temporary = calls[renames[0]][1]
    assert ("fsync", temporary) in calls[:renames[0]], calls
    assert ("fsync", str(root / "out")) in calls[renames[0]:], calls


def test_stale_lock_of_a_killed_run_does_not_block(tmp_path, source):
    (tmp_path / ".out.converter_core.lock").write_text("")  # left by a run killed with SIGKILL
    subprocess.run(command(source, tmp_path / "out"), check=True, capture_output=True, timeout=120)
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (tmp_path / ".out.converter_core.lock").exists()


# ======== untrusted input ========

TIMEOUT = 60          # a hang fails the test instead of blocking it
TINY = dict(num_hidden_layers=2)


# ---- fixtures: each pristine checkpoint is made once; every test sabotages its own copy ----

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    make_hf_model(root / "hf", **TINY)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", root / "hf", "--save-dir", root / "ranks")
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", root / "hf", "--save-dir", root / "dist",
            "--ckpt-format", "torch_dist")
    return root


def copy_of(pristine, tmp_path, kind):
    source = tmp_path / kind
    shutil.copytree(pristine / kind, source, symlinks=True)
    return source


def snapshot(folder):
    """Every entry under `folder`, by kind and content, without following links or opening FIFOs."""
    state = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(directory) / name
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                state[relative] = ("link", os.readlink(path))
            elif path.is_fifo():
                state[relative] = ("fifo",)
            elif path.is_file():
                state[relative] = ("file", path.read_bytes())
            else:
                state[relative] = ("folder",)
    return state


def processes_naming(*paths):
    """Processes whose command line names one of `paths`: a run's parent and its (forked) loader and saver."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or ())
        if any(str(path) in line for path in paths):
            found.append(process)
    return found


def refused(source, loader, saver, *flags, expect=(), out=None):
    """Convert `source` and check it fails cleanly: one error line, nothing staged or complete, the source as
    it was, no process of the run left and no /dev/shm entry gained. Returns the error line."""
    out = out or source.parent / "out"
    before = snapshot(source)
    shared_memory = set(os.listdir("/dev/shm"))
    process = convert("--loader", loader, "--saver", saver, "--load-dir", source, "--save-dir", out, *flags,
                      ok=False, timeout=TIMEOUT)
    line = error_line(process)
    for text in expect:
        assert text in line, line
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert not list(out.parent.glob(f".{out.name}*")), "a staged folder was left behind"
    assert snapshot(source) == before, "the source folder changed"
    left = processes_naming(source, out)
    assert not left, f"processes of the run left behind: {[p.info['cmdline'] for p in left]}"
    assert set(os.listdir("/dev/shm")) <= shared_memory, set(os.listdir("/dev/shm")) - shared_memory
    return line


def hf_refused(source, *expect):
    return refused(source, "llama_hf", "mcore", expect=expect)


def edit_config(source, **changes):
    config = json.loads((source / "config.json").read_text())
    for name, value in changes.items():
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    (source / "config.json").write_text(json.dumps(config))


def write_index(source, weight_map):
    (source / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def all_in_one_file(source):
    return {name: "model.safetensors" for name in load_file(source / "model.safetensors")}


# ---- 1. paths inside a checkpoint stay inside the source folder ----

@pytest.mark.parametrize("entry", ["../secret.safetensors", "ABSOLUTE", "sub/../../secret.safetensors", 7, None])
def test_index_entry_outside_the_folder_is_refused(pristine, tmp_path, entry):
    source = copy_of(pristine, tmp_path, "hf")
    secret = tmp_path / "secret.safetensors"
    shutil.copy(source / "model.safetensors", secret)  # exists and is valid: only the path is wrong
    weight_map = all_in_one_file(source)
    weight_map["model.embed_tokens.weight"] = str(secret) if entry == "ABSOLUTE" else entry
    write_index(source, weight_map)
    problem = "points outside" if isinstance(entry, str) else "is not a plain relative path"
    hf_refused(source, "model.safetensors.index.json", "weight_map['model.embed_tokens.weight']", problem)


def test_links_the_user_made_keep_working(pristine, tmp_path):
    """The HF cache layout: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>, index included."""
    cache = tmp_path / "cache"
    (cache / "blobs").mkdir(parents=True)
    snapshot_dir = cache / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(pristine / "hf" / name, cache / "blobs" / f"hash-{name}")
        os.symlink(f"../../blobs/hash-{name}", snapshot_dir / name)
    write_index(snapshot_dir, all_in_one_file(snapshot_dir))
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", snapshot_dir, "--save-dir", tmp_path / "out")
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "out", "--save-dir", tmp_path / "back")
    assert_bit_identical(pristine / "hf", tmp_path / "back")


# ---- 3. dtypes a weight may not have ----

def relabel_in_header(path, tensor, new_dtype):
    """Rewrite one tensor's dtype in a safetensors JSON header in place (same byte count)."""
    data = bytearray(path.read_bytes())
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    old = header[tensor]["dtype"]
    header[tensor]["dtype"] = new_dtype
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(encoded) == length and len(new_dtype) == len(old)
    data[8:8 + length] = encoded
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"])
def test_float_weight_relabelled_int32_is_refused(pristine, tmp_path, tensor):
    source = copy_of(pristine, tmp_path, "hf")
    relabel_in_header(source / "model.safetensors", tensor, "I32")
    hf_refused(source, str(source / "model.safetensors"), tensor, "torch.int32", "not a floating-point weight")


def test_integer_weight_in_pytorch_bin_is_refused(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    state = load_file(source / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"].view(torch.int32)
    torch.save(state, source / "pytorch_model.bin")
    os.remove(source / "model.safetensors")
    hf_refused(source, "pytorch_model.bin", "model.layers.0.self_attn.k_proj.weight", "not a floating-point weight")


# ---- 4. regular files only, JSON size-capped ----

def test_config_that_is_a_fifo_fails_fast(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    os.remove(source / "config.json")
    os.mkfifo(source / "config.json")
    hf_refused(source, str(source / "config.json"), "not a regular file")


def test_config_linked_to_dev_zero_is_refused(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    os.remove(source / "config.json")
    os.symlink("/dev/zero", source / "config.json")
    hf_refused(source, str(source / "config.json"), "not a regular file")


def test_oversized_config_is_not_read(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    os.truncate(source / "config.json", 65 * 2**20)  # sparse: costs no disk
    hf_refused(source, str(source / "config.json"), "more than the 67108864 bytes allowed")


def test_deeply_nested_config_is_one_line(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    (source / "config.json").write_text("[" * 200000 + "]" * 200000)
    hf_refused(source, str(source / "config.json"), "nested too deeply")


def test_weights_that_are_a_fifo_fail_fast(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    os.remove(source / "model.safetensors")
    os.mkfifo(source / "model.safetensors")
    hf_refused(source, str(source / "model.safetensors"), "not a regular file")


def test_vocab_file_that_is_a_fifo_fails_fast(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "ranks")
    os.mkfifo(tmp_path / "vocab.json")
    refused(source, "mcore", "llama_hf", "--vocab-file", tmp_path / "vocab.json",
            expect=[str(tmp_path / "vocab.json"), "not a regular file"])


@pytest.mark.parametrize("content,expect", [
    (b"1e3", "expected an iteration number"), (b"-1", "expected an iteration number"),
    (b"9" * 40, "expected an iteration number"), ("\u0661".encode(), "expected an iteration number"),
    (b"\xff\xfe1", "expected an iteration number"), ("FIFO", "not a regular file"),
    ("/dev/zero", "not a regular file"), ("HUGE", "more than the 4096 bytes allowed")])
def test_bad_tracker_file_is_refused(pristine, tmp_path, content, expect):
    source = copy_of(pristine, tmp_path, "ranks")
    tracker = source / "latest_checkpointed_iteration.txt"
    os.remove(tracker)
    if content == "FIFO":
        os.mkfifo(tracker)
    elif content == "/dev/zero":
        os.symlink("/dev/zero", tracker)
    elif content == "HUGE":
        tracker.write_text("1")
        os.truncate(tracker, 2**20)
    else:
        tracker.write_bytes(content)
    refused(source, "mcore", "llama_hf", expect=[str(tracker), expect])


# ---- 5. config counts: positive integers, checked against the weights before anything is sized ----

@pytest.mark.parametrize("field,value,expect", [
    ("num_hidden_layers", 1e9, "num_hidden_layers must be a positive integer, got 1000000000.0"),
    ("num_hidden_layers", 10**9, "num_hidden_layers is 1000000000, but the weights hold layers 0..1 (2 of them)"),
    ("num_hidden_layers", 3, "num_hidden_layers is 3, but the weights hold layers 0..1"),
    ("num_hidden_layers", -1, "num_hidden_layers must be a positive integer, got -1"),
    ("num_hidden_layers", True, "num_hidden_layers must be a positive integer, got True"),
    ("num_hidden_layers", "4", "num_hidden_layers must be a positive integer, got '4'"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, got 0"),
    ("num_key_value_heads", 3, "4 attention heads are not a multiple of 3 KV heads"),
    ("hidden_size", 64.0, "hidden_size must be a positive integer, got 64.0"),
    ("intermediate_size", [160], "intermediate_size must be a positive integer, got [160]"),
    ("vocab_size", None, "missing field 'vocab_size'"),
    ("head_dim", -16, "head_dim must be a positive integer, got -16"),
    ("max_position_embeddings", 0, "max_position_embeddings must be a positive integer, got 0"),
])
def test_bad_config_count_is_refused(pristine, tmp_path, field, value, expect):
    source = copy_of(pristine, tmp_path, "hf")
    edit_config(source, **{field: value})
    hf_refused(source, str(source / "config.json"), expect)


def test_hidden_size_not_divisible_by_heads_without_head_dim(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    edit_config(source, hidden_size=66, head_dim=None)
    hf_refused(source, "hidden_size 66 is not a multiple of 4 attention heads")


def test_sizes_are_checked_against_the_weights_before_streaming(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "hf")
    edit_config(source, vocab_size=10**12)
    hidden = BASE["hidden_size"]
    hf_refused(source, f"model.embed_tokens.weight has shape [{BASE['vocab_size']}, {hidden}], "
                       f"config.json implies [1000000000000, {hidden}]")


# ---- 2. torch_dist: paths, byte ranges and chunks from .metadata ----

def edit_dcp_metadata(iteration, change):
    path = iteration / ".metadata"
    with open(path, "rb") as handle:
        metadata = pickle.load(handle)
    change(metadata)
    with open(path, "wb") as handle:
        pickle.dump(metadata, handle)


STACKED = "decoder.layers.mlp.linear_fc2.weight"  # [layers, hidden, ffn], one chunk per layer
LAYER_ELEMENTS = BASE["hidden_size"] * BASE["intermediate_size"]


def duplicate_chunk(md, outside):
    md.state_dict_metadata[STACKED].chunks.append(md.state_dict_metadata[STACKED].chunks[0])


def move_chunk_onto_another(md, outside):
    chunks = md.state_dict_metadata[STACKED].chunks
    chunks[1] = type(chunks[1])(offsets=chunks[0].offsets, sizes=chunks[1].sizes)


def chunk_out_of_bounds(md, outside):
    chunk = md.state_dict_metadata[STACKED].chunks[1]
    md.state_dict_metadata[STACKED].chunks[1] = type(chunk)(offsets=torch.Size([5, 0, 0]), sizes=chunk.sizes)


def chunk_of_wrong_rank(md, outside):
    chunk = md.state_dict_metadata[STACKED].chunks[1]
    md.state_dict_metadata[STACKED].chunks[1] = type(chunk)(offsets=torch.Size([1, 0]), sizes=torch.Size([1, 64]))


def path_with_dotdot(md, outside):
    for info in md.storage_data.values():
        info.relative_path = "../x.distcp"


def absolute_path(md, outside):
    for info in md.storage_data.values():
        info.relative_path = outside


def path_not_a_string(md, outside):
    for info in md.storage_data.values():
        info.relative_path = b"__0_0.distcp"


def byte_range_past_the_file(md, outside):
    for index, info in md.storage_data.items():
        if index.fqn == STACKED:
            info.length = 10**9


def weight_relabelled_int32(md, outside):
    md.state_dict_metadata[STACKED].properties.dtype = torch.int32


@pytest.mark.parametrize("change,expect", [
    (duplicate_chunk, f"{STACKED}: the chunks hold {(TINY['num_hidden_layers'] + 1) * LAYER_ELEMENTS} elements, "
                      f"the tensor {TINY['num_hidden_layers'] * LAYER_ELEMENTS}"),
    (move_chunk_onto_another, f"{STACKED}: chunks at [0, 0, 0] and [0, 0, 0] overlap"),
    (chunk_out_of_bounds, f"{STACKED}: chunk at torch.Size([5, 0, 0]) of size "
                          f"torch.Size([1, {BASE['hidden_size']}, {BASE['intermediate_size']}]) is not inside"),
    (chunk_of_wrong_rank, f"{STACKED}: chunk at torch.Size([1, 0]) of size torch.Size([1, 64]) is not inside"),
    (path_with_dotdot, "file name '../x.distcp' points outside"),
    (absolute_path, "x.distcp' points outside"),
    (path_not_a_string, "file name b'__0_0.distcp' is not a plain relative path"),
    (byte_range_past_the_file, "truncated (needs"),
    (weight_relabelled_int32, f"{STACKED} is stored as torch.int32, not a floating-point weight"),
], ids=lambda value: value.__name__ if callable(value) else "")
def test_bad_dcp_metadata_is_refused(pristine, tmp_path, change, expect):
    source = copy_of(pristine, tmp_path, "dist")
    iteration = source / "iter_0000001"
    outside = tmp_path / "x.distcp"
    shutil.copy(iteration / "__0_0.distcp", outside)  # readable, valid, and outside the source
    with open(iteration / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    change(metadata, str(outside))
    with open(iteration / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    line = refused(source, "mcore", "llama_hf", expect=[expect])
    assert str(iteration) in line


# ---- 6. output: open files bounded, write errors one line ----

def run_limited(limits, *flags, ignore_sigxfsz=False):
    """The converter's command line under resource limits (inherited by its loader and saver)."""
    argv = ["converter_core", "--model-type", "GPT", *map(str, flags)]
    code = ("import resource, runpy, signal, sys\n"
            f"for name, value in {limits!r}: resource.setrlimit(getattr(resource, name), (value, value))\n"
            + ("signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n" if ignore_sigxfsz else "")
            + f"sys.argv = {argv!r}\nrunpy.run_module('converter_core', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_more_shards_than_open_files(tmp_path):
    """201 one-tensor shards written under a limit of 128 open files, byte-identical to a normal run.
    (Lower limits starve the loader -> saver queue, whose shared tensors each hold a descriptor.)"""
    make_hf_model(tmp_path / "hf", num_hidden_layers=22, hidden_size=16, intermediate_size=32,
                  num_attention_heads=2, num_key_value_heads=1, vocab_size=32)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "mcore")
    shard = ("--max-shard-size", "1")
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "mcore", "--save-dir",
            tmp_path / "normal", *shard)
    process = run_limited([("RLIMIT_NOFILE", 128)], "--loader", "mcore", "--saver", "llama_hf", "--load-dir",
                          tmp_path / "mcore", "--save-dir", tmp_path / "limited", *shard)
    assert process.returncode == 0, process.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "normal").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == 3 + 22 * 9
    assert sorted(p.name for p in (tmp_path / "limited").iterdir()) == files
    for name in files:
        assert (tmp_path / "limited" / name).read_bytes() == (tmp_path / "normal" / name).read_bytes(), name
    assert_bit_identical(tmp_path / "hf", tmp_path / "limited")


def test_file_too_large_while_writing_safetensors(pristine, tmp_path):
    """RLIMIT_FSIZE (SIGXFSZ ignored) makes writes fail with EFBIG: the same path as a full disk, unprivileged.
    Every tensor (and its shared-memory segment) is under the limit; the single shard is not."""
    source = copy_of(pristine, tmp_path, "ranks")
    before = snapshot(source)
    out = tmp_path / "out"
    process = run_limited([("RLIMIT_FSIZE", 200_000)], "--loader", "mcore", "--saver", "llama_hf", "--load-dir",
                          source, "--save-dir", out, ignore_sigxfsz=True)
    line = error_line(process)
    assert "model.safetensors: cannot write (File too large)" in line, line
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    assert snapshot(source) == before


def rewrite_rank_file(source, change):
    path = next(source.glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    state = torch.load(path, weights_only=False)
    change(state)
    torch.save(state, path)
    return path


def test_integer_weight_in_a_rank_file_is_refused(pristine, tmp_path):
    source = copy_of(pristine, tmp_path, "ranks")

    def relabel(state):
        state["model"]["decoder.final_layernorm.weight"] = state["model"]["decoder.final_layernorm.weight"].to(torch.int32)
    path = rewrite_rank_file(source, relabel)
    line = refused(source, "mcore", "llama_hf", expect=["decoder.final_layernorm.weight has dtype torch.int32"])
    assert str(path) in line


@pytest.mark.parametrize("field,value", [("num_layers", 10**9), ("num_layers", -1), ("hidden_size", True),
                                         ("num_attention_heads", None), ("ffn_hidden_size", 1.5e3),
                                         ("kv_channels", "16")])
def test_bad_count_in_megatron_args_is_refused(pristine, tmp_path, field, value):
    source = copy_of(pristine, tmp_path, "ranks")
    path = rewrite_rank_file(source, lambda state: setattr(state["args"], field, value))
    line = refused(source, "mcore", "llama_hf", expect=[str(path.parent.parent)])  # the file, or its folder
    assert any(text in line for text in (f"{field} is", f"no {field}", "holds 2 layers, args say 1000000000")), line
