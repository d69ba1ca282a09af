"""The fault matrix: collisions, planted files, signals, killed processes, full and read-only disks.
Each case asserts one error line, a non-zero exit within seconds, nothing marked complete, the source
untouched, no process of the run left, and that the same command then succeeds."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import assert_bit_identical, error_line, make_hf_model
from test_cli_and_plugins import plugin_env

# Wraps one of our savers: after each message it touches <save-dir>.progress and, from the first
# layer on, waits --slow-seconds, so a test can act mid-run and knows when it is mid-run.
SLOW_SAVER = '''
import importlib, os, time

def add_arguments(parser):
    importlib.import_module("converter_plugins.saver_" + os.environ["SLOW_SAVER"]).add_arguments(parser)
    parser.add_argument("--slow-seconds", type=float, default=0.5)

class Slow:
    def __init__(self, queue, marker, seconds):
        self.queue, self.marker, self.seconds = queue, marker, seconds
    def get(self, *a, **k):
        value = self.queue.get(*a, **k)
        if isinstance(value, dict) and value.get("name", "").startswith("transformer layer"):
            with open(self.marker, "a") as handle:
                handle.write(f"{os.getpid()} {value['name']}\\n")
            time.sleep(self.seconds)
        return value

def save_checkpoint(queue, args):
    saver = importlib.import_module("converter_plugins.saver_" + os.environ["SLOW_SAVER"])
    saver.save_checkpoint(Slow(queue, args.save_dir + ".progress", args.slow_seconds), args)
'''

LAYERS = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults") / "hf"
    make_hf_model(folder, num_hidden_layers=LAYERS)
    return folder


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def command(source, target, saver="mcore", *flags):
    loader = "llama_hf" if Path(source).joinpath("config.json").exists() else "mcore"
    return [sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", loader, "--saver", saver,
            "--load-dir", str(source), "--save-dir", str(target), *map(str, flags)]


def slow_env(tmp_path, saver):
    env = plugin_env(tmp_path, saver_slow=SLOW_SAVER)
    env["SLOW_SAVER"] = saver
    return env


def start_slow(tmp_path, source, target, saver="mcore", seconds=0.5):
    """Start a slow conversion and return it once it is writing layers."""
    process = subprocess.Popen(command(source, target, "slow", "--slow-seconds", seconds),
                               env=slow_env(tmp_path, saver), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    marker = Path(str(target) + ".progress")
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.05)
    return process, psutil.Process(process.pid).children(recursive=True)


def assert_nothing_complete(target):
    """No tracker, no config.json, no staged or final output anywhere around `target`."""
    target = Path(target)
    if target.exists():
        assert not list(target.rglob("latest_checkpointed_iteration.txt")) and not list(target.rglob("config.json"))
        assert not list(target.rglob("iter_*"))
    assert not [p for p in target.parent.iterdir() if ".partial" in p.name], list(target.parent.iterdir())


def assert_gone(processes, seconds=5, shared_memory_before=None):
    """No process of the run alive within `seconds`, and no /dev/shm segment left behind."""
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    assert not alive, f"still running: {alive}"
    if shared_memory_before is not None:
        assert set(os.listdir("/dev/shm")) <= shared_memory_before


def finish(process, seconds=30):
    out, err = process.communicate(timeout=seconds)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.mark.parametrize("saver", ["mcore", "llama_hf"])
def test_second_run_into_the_same_save_dir_is_refused(tmp_path, source, saver):
    before = snapshot(source)
    target = tmp_path / "out"
    first, _ = start_slow(tmp_path, source, target, saver, seconds=1.5)
    second = subprocess.run(command(source, target, saver), capture_output=True, text=True, timeout=60)
    assert "another conversion is writing there" in error_line(second) and second.returncode == 1
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
    process, children = start_slow(tmp_path, source, target, saver)
    started = time.monotonic()
    os.kill(process.pid, signum)
    result = finish(process)
    assert time.monotonic() - started < 5
    assert result.returncode == 128 + signum
    assert f"interrupted by {signal.Signals(signum).name}" in error_line(result)
    assert_gone(children, shared_memory_before=shared_memory)
    assert_nothing_complete(target)
    os.unlink(str(target) + ".progress")
    subprocess.run(command(source, target, saver), check=True, capture_output=True, timeout=120)


def test_ctrl_c_to_the_whole_group_is_an_interruption(tmp_path, source):
    target = tmp_path / "out"
    shared_memory = set(os.listdir("/dev/shm"))
    process, children = start_slow(tmp_path, source, target)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    result = finish(process)
    assert result.returncode == 130 and "interrupted by SIGINT" in error_line(result)
    assert_gone(children, shared_memory_before=shared_memory)
    assert_nothing_complete(target)


@pytest.mark.parametrize("saver", ["mcore", "llama_hf"])
def test_parent_killed_leaves_nothing(tmp_path, source, saver):
    target = tmp_path / "out"
    shared_memory = set(os.listdir("/dev/shm"))
    process, children = start_slow(tmp_path, source, target, saver)
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
    process, children = start_slow(tmp_path, source, target)
    saver_pid = int(Path(str(target) + ".progress").read_text().split()[0])
    chosen = [c for c in children if (c.pid == saver_pid) == (victim == "saver")][0]
    chosen.kill()
    result = finish(process)
    assert f"{victim} was killed by signal 9" in error_line(result) and result.returncode == 1
    assert_gone(children, shared_memory_before=shared_memory)
    assert_nothing_complete(target)


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
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", loader,
                             "--saver", saver, "--load-dir", str(source), "--save-dir", str(tmp_path / "out"),
                             "--stall-timeout", "2", "--max-queue-size", "1"], capture_output=True, text=True,
                            timeout=60, env=env)
    assert time.monotonic() - started < 20
    expected = {"loader": "saver failed: stalled: no message from the loader for 2 s",
                "saver": "loader failed: stalled: the saver took no message for 2 s"}[stalled]
    assert expected in error_line(result) and result.returncode == 1
    assert_nothing_complete(tmp_path / "out")


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


def test_stale_lock_of_a_killed_run_does_not_block(tmp_path, source):
    (tmp_path / ".out.converter_core.lock").write_text("")  # left by a run killed with SIGKILL
    subprocess.run(command(source, tmp_path / "out"), check=True, capture_output=True, timeout=120)
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (tmp_path / ".out.converter_core.lock").exists()
