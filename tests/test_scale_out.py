"""Scale-out on torch.distributed (issue 28), through torchrun (python -m torch.distributed.run), --processes
and the API's processes=: the output is byte-identical to one process's (per-rank torch files at TP 2 x PP 2,
sharded HF safetensors; torch_dist: the same tensors and metadata entries) at world sizes 1, 2 and 3, also
when there are more ranks than files. All or nothing: a rank killed mid-run, or SIGTERM to torchrun, ends
every process within 10 s with one error line naming the rank, nothing complete, nothing staged, and the
same command then succeeds. A run is held mid-layer by a gate (a FIFO) the test never opens, not by sleeps."""

import filecmp
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import converter_core
from helpers import convert, error_line, make_hf_model
from test_cli_and_plugins import plugin_env

LAYERS = 6
TP_PP = ["--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2]
TP_PP_KEYWORDS = dict(target_tensor_parallel_size=2, target_pipeline_parallel_size=2)
SHARDS = ["--max-shard-size", "200KB"]  # six shards of the tiny model
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Wraps a built-in saver (GATED_SAVER): the rank GATE_RANK, at its first transformer layer, writes its own
# pid (the rank's process: the saver's parent) into the FIFO GATE.ready and waits on the FIFO GATE for ever.
# finish_share is the wrapped saver's, so the job can be split; saver_plain has none.
GATED_SAVER = '''
import importlib, os
from converter_core import share as sharing
from converter_core.errors import ConversionError

BASE = importlib.import_module("converter_plugins.saver_" + os.environ["GATED_SAVER"])
add_arguments, finish_share = BASE.add_arguments, BASE.finish_share

class Gated:
    def __init__(self, queue):
        self.queue, self.held = queue, False
    def get(self, *args, **kwargs):
        value = self.queue.get(*args, **kwargs)
        if not self.held and isinstance(value, dict) and value.get("name", "").startswith("transformer layer"):
            self.held = True
            with open(os.environ["GATE"] + ".ready", "w") as ready:
                ready.write(f"{os.getppid()}\\n")
            with open(os.environ["GATE"], "rb", buffering=0) as gate:
                gate.read(1)
        return value

def save_checkpoint(queue, args):
    share = sharing.of(args)
    held = share is not None and share.rank == int(os.environ["GATE_RANK"])
    if held and os.environ.get("GATE_FAILS"):
        raise ConversionError(os.environ["GATE_FAILS"])
    BASE.save_checkpoint(Gated(queue) if held else queue, args)
'''
PLAIN_SAVER = '''
from converter_plugins.saver_mcore import add_arguments, save_checkpoint
'''


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny HF model, its one-process Megatron-Core conversion (TP 2 x PP 2), and that one's one-process
    conversions to sharded HF and to torch_dist: the references every split run must equal."""
    folder = tmp_path_factory.mktemp("scale")
    make_hf_model(folder / "hf", num_hidden_layers=LAYERS)
    converter_core.convert("llama_hf", "mcore", folder / "hf", folder / "mcore", **TP_PP_KEYWORDS)
    converter_core.convert("mcore", "llama_hf", folder / "mcore", folder / "sharded", max_shard_size="200KB")
    converter_core.convert("llama_hf", "mcore", folder / "hf", folder / "dist", ckpt_format="torch_dist",
                           **TP_PP_KEYWORDS)
    assert len(list((folder / "sharded").glob("*.safetensors"))) == 6
    return folder


def assert_same_files(expected, got):
    """The same relative paths, each file byte for byte."""
    expected, got = Path(expected), Path(got)
    files = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(got) for p in got.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(expected, got, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def assert_same_dist(expected, got):
    """torch_dist: the same tracker, common and metadata files, the same DCP metadata entries (every key's
    size, dtype and chunks), and the same tensors (the number of data files follows the writers)."""
    expected, got = Path(expected), Path(got)
    iteration = (expected / "latest_checkpointed_iteration.txt").read_text()
    assert (got / "latest_checkpointed_iteration.txt").read_text() == iteration
    a, b = expected / f"iter_{int(iteration):07d}", got / f"iter_{int(iteration):07d}"
    for name in ("common.pt", "metadata.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta_a, meta_b = FileSystemReader(str(a)).read_metadata(), FileSystemReader(str(b)).read_metadata()
    assert meta_a.state_dict_metadata == meta_b.state_dict_metadata
    dcp_to_torch_save(str(a), str(expected.parent / f"{expected.name}.pt"))
    dcp_to_torch_save(str(b), str(got.parent / f"{got.name}.pt"))
    tensors_a = torch.load(expected.parent / f"{expected.name}.pt", weights_only=False)
    tensors_b = torch.load(got.parent / f"{got.name}.pt", weights_only=False)
    assert sorted(tensors_a) == sorted(tensors_b)
    for key, value in tensors_a.items():
        assert same(value, tensors_b[key]), key


def same(a, b):
    """Equal values, tensors bit for bit (also inside lists: DCP's byte-stream entries)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*flags, nproc=2, env=None):
    """torchrun --standalone on one node; returns the CompletedProcess."""
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), "-m", "converter_core",
               "--model-type", "GPT", *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.parametrize("nproc", [1, 2, 3])
def test_torchrun_per_rank_torch_files(tmp_path, source, nproc):
    process = torchrun("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source / "hf",
                       "--save-dir", tmp_path / "out", *TP_PP, nproc=nproc)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.count(f"wrote {tmp_path / 'out'}:") == 1  # one summary, rank 0's
    assert_same_files(source / "mcore", tmp_path / "out")


def test_two_torchrun_launchers_rendezvous_on_localhost(tmp_path, source):
    """Two "nodes" (--nnodes 2, one rank each) on 127.0.0.1 write one sharded HF folder together."""
    port = free_port()
    launchers = [subprocess.Popen(
        [*TORCHRUN, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "-m", "converter_core", "--model-type", "GPT", "--loader", "mcore",
         "--saver", "llama_hf", "--load-dir", str(source / "mcore"), "--save-dir", str(tmp_path / "out"), *SHARDS],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [launcher.communicate(timeout=180) for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], results
    assert results[0][0].count(f"wrote {tmp_path / 'out'}:") == 1 and not results[1][0]  # node 0 speaks for the job
    assert_same_files(source / "sharded", tmp_path / "out")


@pytest.mark.parametrize("processes, formats", [(1, ["torch_dist"]), (2, ["hf", "torch_dist"]), (3, ["hf"])])
def test_processes_flag(tmp_path, source, processes, formats):
    """--processes K: sharded HF and torch_dist, each equal to one process's; one summary."""
    if "hf" in formats:
        process = convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", source / "mcore",
                          "--save-dir", tmp_path / "hf", *SHARDS, "--processes", processes)
        assert process.stdout.count(f"wrote {tmp_path / 'hf'}:") == 1 and not process.stderr.strip(), process
        assert_same_files(source / "sharded", tmp_path / "hf")
    if "torch_dist" in formats:
        convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source / "hf", "--save-dir",
                tmp_path / "dist", "--ckpt-format", "torch_dist", *TP_PP, "--processes", processes)
        assert_same_dist(source / "dist", tmp_path / "dist")


@pytest.mark.parametrize("processes", [2, 3])
def test_api_processes(tmp_path, source, processes):
    """convert(processes=K): the calling process is rank 0; one event stream whose events say their rank,
    one start and one finish, the job's fraction reaching 1 and its bytes the output's."""
    events = []
    result = converter_core.convert("llama_hf", "mcore", source / "hf", tmp_path / "out",
                                    target_tensor_parallel_size=2, target_pipeline_parallel_size=2,
                                    processes=processes, progress=events.append)
    assert_same_files(source / "mcore", tmp_path / "out")
    assert result.files == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    kinds = [event.event for event in events]
    assert kinds.count("start") == processes and kinds.count("finish") == 1 and kinds[-1] == "finish"
    assert {event.rank for event in events if event.event == "written"} == set(range(processes))
    fractions = [event.fraction for event in events if event.event in ("sent", "written")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and 0 < fractions[0] < 1 / processes
    written = [event for event in events if event.event == "written"]
    assert written[-1].bytes_done == sum(event.bytes for event in written if event.rank == 0)  # each message once
    assert events[-1].bytes == result.bytes


def test_more_ranks_than_files(tmp_path, source):
    """TP 1 x PP 1 is one rank file: two of the three ranks own nothing, idle and succeed; one warning says so."""
    assert converter_core.convert("llama_hf", "mcore", source / "hf", tmp_path / "one").warnings == []
    result = converter_core.convert("llama_hf", "mcore", source / "hf", tmp_path / "three", processes=3)
    assert result.warnings == ["the output splits into 1 part(s) for 3 ranks: 2 rank(s) have nothing to write (ranks "
                               "share whole files, torch_dist whole layers; an HF output is split into more with "
                               "--max-shard-size)"]
    assert len([p for p in (tmp_path / "one").rglob("*") if p.is_file()]) == 2  # the tracker and one rank file
    assert_same_files(tmp_path / "one", tmp_path / "three")


def test_a_saver_that_cannot_be_split_is_refused_before_anything_starts(tmp_path, source):
    process = convert("--loader", "llama_hf", "--saver", "plain", "--load-dir", source / "hf",
                      "--save-dir", tmp_path / "out", "--processes", 2, ok=False,
                      env=plugin_env(tmp_path, saver_plain=PLAIN_SAVER))
    assert error_line(process) == ("converter_core: error: saver plain cannot be split over ranks (it has no "
                                   "finish_share); run it in one process") and process.returncode == 1
    assert not (tmp_path / "out").exists()


def test_processes_that_cannot_run_are_one_line(tmp_path, source):
    """--processes 0 (command line and API), and a dry run split over processes: one line, nothing written."""
    import converter_core
    common = ["--loader", "llama_hf", "--saver", "mcore", "--load-dir", source / "hf", "--save-dir", tmp_path / "out"]
    process = convert(*common, "--processes", 0, ok=False)
    assert error_line(process) == "converter_core: error: argument --processes: must be a positive integer, got '0'"
    assert process.returncode == 2
    with pytest.raises(converter_core.ConversionError) as raised:
        converter_core.convert("llama_hf", "mcore", source / "hf", tmp_path / "out", processes=0)
    assert str(raised.value) == "argument processes: must be a positive integer, got '0'" and raised.value.status == 2
    process = convert(*common, "--processes", 2, "--dry-run", ok=False)
    assert error_line(process) == ("converter_core: error: --dry-run plans the conversion in one process; run it "
                                   "without --processes or torchrun (the files and sizes are the same)")
    assert process.returncode == 1
    assert not (tmp_path / "out").exists()


def gated(tmp_path, command, rank, saver="mcore"):
    """Start `command` (a run with --saver gated) whose rank `rank` stops at its first layer; returns the
    launcher process and, once that rank waits there, the pid of that rank's process."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    os.mkfifo(f"{gate}.ready")
    gate_fd = os.open(gate, os.O_RDWR)  # the saver's open never waits; its read waits for ever
    ready_fd = os.open(f"{gate}.ready", os.O_RDWR | os.O_NONBLOCK)
    env = plugin_env(tmp_path, saver_gated=GATED_SAVER)
    env.update(GATED_SAVER=saver, GATE=str(gate), GATE_RANK=str(rank))
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    launcher.fds = (gate_fd, ready_fd)
    if not select.select([ready_fd], [], [], 120)[0]:  # only against a hang
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail(f"rank {rank} never reached its gate: {launcher.communicate()}")
    return launcher, int(os.read(ready_fd, 64).split()[0])


def assert_all_gone_and_rerun(tmp_path, launcher, victims, source, stop):
    """After `stop()`: every process of the job gone within 10 s, one error line, nothing complete or
    staged; then the same conversion in one process succeeds."""
    processes = psutil.Process(launcher.pid).children(recursive=True)  # the launcher is Popen's to reap
    assert len(processes) + 1 >= victims
    stop()
    started = time.monotonic()
    _, alive = psutil.wait_procs(processes, timeout=10)
    assert not alive, f"still running 10 s after: {[p.cmdline() for p in alive]}"
    out, err = launcher.communicate(timeout=max(0.1, 10 - (time.monotonic() - started)))
    for fd in launcher.fds:
        os.close(fd)
    assert launcher.returncode != 0, (out, err)
    target = tmp_path / "out"
    assert not target.exists() or not any(target.iterdir()), list(target.rglob("*"))
    assert not [p for p in tmp_path.rglob("*") if ".partial" in p.name]
    converter_core.convert("llama_hf", "mcore", source / "hf", target, **TP_PP_KEYWORDS)  # the rerun
    assert_same_files(source / "mcore", target)
    return err


def test_a_rank_killed_mid_run_stops_every_rank(tmp_path, source):
    """--processes 3: SIGKILL to rank 1 while its saver is mid-layer."""
    command = [sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", "llama_hf", "--saver",
               "gated", "--load-dir", str(source / "hf"), "--save-dir", str(tmp_path / "out"),
               *map(str, TP_PP), "--processes", "3"]
    launcher, rank_pid = gated(tmp_path, command, rank=1)
    err = assert_all_gone_and_rerun(tmp_path, launcher, 9, source, lambda: os.kill(rank_pid, signal.SIGKILL))
    lines = [line for line in err.splitlines() if line.startswith("converter_core: error:")]
    assert lines == ["converter_core: error: rank 1 was killed by signal 9"], err
    assert "Traceback" not in err


def test_a_rank_that_fails_is_named_with_its_cause(tmp_path, source):
    env = plugin_env(tmp_path, saver_gated=GATED_SAVER)
    env.update(GATED_SAVER="llama_hf", GATE="", GATE_RANK="2",
               GATE_FAILS="/disk: cannot write (No space left on device)")
    process = convert("--loader", "mcore", "--saver", "gated", "--load-dir", source / "mcore", "--save-dir",
                      tmp_path / "out", *SHARDS, "--processes", 3, ok=False, env=env)
    assert error_line(process) == ("converter_core: error: rank 2 failed: saver failed: /disk: cannot write "
                                   "(No space left on device)") and process.returncode == 1
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_sigterm_to_torchrun_stops_every_rank(tmp_path, source):
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "converter_core", "--model-type", "GPT",
               "--loader", "llama_hf", "--saver", "gated", "--load-dir", str(source / "hf"),
               "--save-dir", str(tmp_path / "out"), *map(str, TP_PP)]
    launcher, _ = gated(tmp_path, command, rank=1)
    err = assert_all_gone_and_rerun(tmp_path, launcher, 7, source, lambda: os.kill(launcher.pid, signal.SIGTERM))
    lines = [line for line in err.splitlines() if line.startswith("converter_core: error:")]
    assert len(lines) == 1 and "interrupted by SIGTERM" in lines[0], err


def test_a_killed_torchrun_worker_stops_the_others(tmp_path, source):
    """SIGKILL to torchrun's rank 0 worker: its agent stops rank 1, which removes the job's staging."""
    command = [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "converter_core", "--model-type", "GPT",
               "--loader", "llama_hf", "--saver", "gated", "--load-dir", str(source / "hf"),
               "--save-dir", str(tmp_path / "out"), *map(str, TP_PP)]
    launcher, rank_pid = gated(tmp_path, command, rank=0)
    assert_all_gone_and_rerun(tmp_path, launcher, 7, source, lambda: os.kill(rank_pid, signal.SIGKILL))
