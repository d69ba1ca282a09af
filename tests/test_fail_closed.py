"""Fail closed where a run used to go wrong quietly or leave debris: mis-shaped TP/EP shards, staged
output of killed runs, interrupts at random moments, cancellation and callbacks of the Python API,
tied weights that differ, stalls. Each case runs the real command line or the real API."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import assert_bit_identical, convert, error_line, make_hf_model

RANK_FILE = "model_optim_rng.pt"


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fail_closed") / "hf"
    make_hf_model(folder, num_hidden_layers=4)
    return folder


@pytest.fixture(scope="module")
def mcore_tp2pp2(hf_source):
    target = hf_source.parent / "mcore"
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", hf_source, "--save-dir", target,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    return target


def assert_nothing_complete(target):
    target = Path(target)
    assert not target.exists() or not any(target.iterdir()), list(target.rglob("*"))
    assert not [p for p in target.parent.iterdir() if ".partial" in p.name], list(target.parent.iterdir())


def reshape_in_rank_file(folder, rank, name, change):
    """Replace `name` in one rank file of a copy of a Megatron checkpoint by change(tensor)."""
    path = folder / "iter_0000001" / rank / RANK_FILE
    state = torch.load(path, weights_only=False)
    state["model"][name] = change(state["model"][name])
    torch.save(state, path)


def extra_columns(tensor):
    return torch.cat([tensor, torch.ones(tensor.shape[0], 8, dtype=tensor.dtype)], dim=1)


def extra_rows(tensor):
    return torch.cat([tensor, torch.ones(8, *tensor.shape[1:], dtype=tensor.dtype)])


MISSHAPEN = {  # (rank folder, tensor, change)
    "qkv columns": ("mp_rank_01_000", "decoder.layers.0.self_attention.linear_qkv.weight", extra_columns),
    "qkv rows": ("mp_rank_01_000", "decoder.layers.0.self_attention.linear_qkv.weight", extra_rows),
    "proj rows": ("mp_rank_01_000", "decoder.layers.1.self_attention.linear_proj.weight", extra_rows),
    "proj columns": ("mp_rank_01_000", "decoder.layers.1.self_attention.linear_proj.weight", extra_columns),
    "fc1 columns": ("mp_rank_01_001", "decoder.layers.0.mlp.linear_fc1.weight", extra_columns),
    "fc2 rows": ("mp_rank_00_001", "decoder.layers.1.mlp.linear_fc2.weight", extra_rows),
    "embedding columns": ("mp_rank_01_000", "embedding.word_embeddings.weight", extra_columns),
    "output columns": ("mp_rank_01_001", "output_layer.weight", extra_columns),
    "norm": ("mp_rank_01_000", "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
             lambda t: torch.cat([t, t[:8]])),
    "final norm": ("mp_rank_00_001", "decoder.final_layernorm.weight", lambda t: torch.cat([t, t[:8]])),
}


@pytest.mark.parametrize("saver", ["llama_hf", "mcore"])
@pytest.mark.parametrize("case", sorted(MISSHAPEN))
def test_a_misshapen_tensor_parallel_shard_is_refused(tmp_path, mcore_tp2pp2, case, saver):
    rank, name, change = MISSHAPEN[case]
    source, target = tmp_path / "mcore", tmp_path / "out"
    shutil.copytree(mcore_tp2pp2, source)
    reshape_in_rank_file(source, rank, name, change)
    flags = ["--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1] if saver == "mcore" else []
    line = error_line(convert("--loader", "mcore", "--saver", saver, "--load-dir", source, "--save-dir", target,
                              *flags, ok=False))
    assert "(unexpected" not in line
    assert name.rsplit(".", 1)[0].split("decoder.")[-1] in line and "shape" in line, line
    assert_nothing_complete(target)


# A saver plugin wrapping one of ours: at the first layer message it writes its pid into the FIFO named
# by $PAUSE_FIFO (the test's signal that the output is being staged) and, with $PAUSE_FOREVER, never
# reads on; otherwise it goes on.
PAUSING_SAVER = '''
import importlib, os, threading

def add_arguments(parser):
    importlib.import_module("converter_plugins.saver_" + os.environ["WRAPPED_SAVER"]).add_arguments(parser)

class Pausing:
    def __init__(self, queue):
        self.queue, self.paused = queue, False
    def get(self, *a, **k):
        value = self.queue.get(*a, **k)
        if not self.paused and isinstance(value, dict) and value.get("name") == "transformer layer 0":
            self.paused = True
            with open(os.environ["PAUSE_FIFO"], "w") as fifo:
                fifo.write(f"{os.getpid()}\\n")
            if os.environ.get("PAUSE_FOREVER"):
                threading.Event().wait()
        return value

def save_checkpoint(queue, args):
    saver = importlib.import_module("converter_plugins.saver_" + os.environ["WRAPPED_SAVER"])
    saver.save_checkpoint(Pausing(queue), args)
'''


def start_paused(tmp_path, source, target, saver, *flags, forever=True):
    """Start a conversion whose saver pauses at layer 0; returns (process, saver pid) once it has."""
    from test_cli_and_plugins import plugin_env
    fifo = tmp_path / "pause.fifo"
    os.mkfifo(fifo)
    env = dict(plugin_env(tmp_path, saver_pausing=PAUSING_SAVER), WRAPPED_SAVER=saver, PAUSE_FIFO=str(fifo))
    if forever:
        env["PAUSE_FOREVER"] = "1"
    loader = "llama_hf" if (Path(source) / "config.json").exists() else "mcore"
    process = subprocess.Popen([sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", loader,
                                "--saver", "pausing", "--load-dir", str(source), "--save-dir", str(target),
                                *map(str, flags)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    with open(fifo) as reader:  # blocks until the saver has the first layer in hand
        pid = int(reader.readline())
    return process, pid


@pytest.mark.parametrize("saver", ["mcore", "llama_hf"])
def test_a_saver_killed_outright_leaves_no_staged_output(tmp_path, hf_source, saver):
    """SIGKILL (the OOM killer) gives the saver no chance to clean up: the parent removes its staging."""
    target = tmp_path / "out"
    shared_memory = set(os.listdir("/dev/shm"))
    process, saver_pid = start_paused(tmp_path, hf_source, target, saver)
    staged = [p for p in [*tmp_path.iterdir(), *(target.iterdir() if target.is_dir() else [])] if ".partial-" in p.name]
    assert staged, "the saver had staged nothing yet"
    children = psutil.Process(process.pid).children(recursive=True)
    os.kill(saver_pid, signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    assert "saver was killed by signal 9" in error_line(result) and result.returncode == 1
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive and set(os.listdir("/dev/shm")) <= shared_memory
    assert_nothing_complete(target)


@pytest.mark.parametrize("saver", ["mcore", "llama_hf"])
def test_staging_of_a_dead_run_is_removed_by_the_next(tmp_path, hf_source, saver):
    """Folders named as our staging (a run killed with the whole machine) are removed by the next run into
    the same --save-dir, which holds its lock and says so; look-alikes with other names are left alone."""
    target = tmp_path / "out"
    if saver == "mcore":
        target.mkdir()
        dead = [target / ".iter_0000001.partial-ab1cd2_e", target / ".latest_checkpointed_iteration.txt.x1y2z3w4"]
    else:
        dead = [tmp_path / ".out.partial-ab1cd2_e"]
    for path in dead:
        if "partial" in path.name:
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "half-written").write_bytes(b"\0" * 100)
        else:
            path.write_text("1")
    kept = [tmp_path / ".out.partial", tmp_path / ".out.partial-short", tmp_path / ".other.partial-ab1cd2_e"]
    for path in kept:
        path.mkdir()
    result = convert("--loader", "llama_hf", "--saver", saver, "--load-dir", hf_source, "--save-dir", target)
    for path in dead:
        assert not path.exists() and f"removed {path}" in result.stdout + result.stderr
    assert all(path.is_dir() for path in kept)


def test_interrupts_at_random_moments_print_one_line(tmp_path, hf_source):
    """Ctrl-C (SIGINT to the whole group), SIGTERM and SIGHUP at any moment of a run, import and
    start-up included: one line (or, once the output is committed, a clean success), never a
    traceback of ours or of multiprocessing's threads, nothing half-written, no process left."""
    import random
    chooser = random.Random(24)
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    for attempt in range(20):
        target = tmp_path / f"out{attempt}"
        process = subprocess.Popen([sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader",
                                    "llama_hf", "--saver", chooser.choice(["mcore", "llama_hf"]), "--load-dir",
                                    str(hf_source), "--save-dir", str(target)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        signum = signals[attempt % 3]
        try:
            process.wait(timeout=chooser.uniform(0.05, 3.5))
        except subprocess.TimeoutExpired:
            children = psutil.Process(process.pid).children(recursive=True)
            os.killpg(process.pid, signum)  # the whole group, as a terminal's Ctrl-C or a job scheduler does
            psutil.wait_procs(children, timeout=30)
        out, err = process.communicate(timeout=120)
        assert "Traceback" not in err and "Exception" not in err, (signum, err)
        if process.returncode == 0:  # it had committed before the signal came
            assert (target / "config.json").exists() or (target / "latest_checkpointed_iteration.txt").exists()
            continue
        assert process.returncode == 128 + signum, (process.returncode, err)
        assert [line for line in err.splitlines() if line.strip()] == [
            f"converter_core: error: interrupted by {signal.Signals(signum).name}"], err
        assert_nothing_complete(target)


def test_a_cancel_set_before_the_run_commits_nothing(tmp_path, hf_source):
    import converter_core
    cancel = threading.Event()
    cancel.set()
    for attempt in range(5):
        target = tmp_path / f"out{attempt}"
        with pytest.raises(converter_core.ConversionError) as raised:
            converter_core.convert("llama_hf", "mcore", hf_source, target, cancel=cancel)
        assert raised.value.kind == "interrupted" and str(raised.value) == "cancelled"
        assert_nothing_complete(target)


def test_cancel_and_commit_never_both(tmp_path, hf_source):
    """A cancel that lands while the saver commits: either the run completes (a Result, the output whole)
    or it is cancelled (ConversionError, nothing complete), never both."""
    import converter_core
    outcomes = set()
    for attempt in range(6):
        target, cancel = tmp_path / f"out{attempt}", threading.Event()

        def cancel_near_the_end(event, cancel=cancel, attempt=attempt):
            if event["event"] == "written" and event["count"] >= event["total"] - attempt % 2:
                cancel.set()
        try:
            result = converter_core.convert("llama_hf", "llama_hf", hf_source, target, progress=cancel_near_the_end,
                                            cancel=cancel)
        except converter_core.ConversionError as error:
            assert error.kind == "interrupted"
            assert_nothing_complete(target)
            outcomes.add("cancelled")
        else:
            assert_bit_identical(hf_source, result.save_dir)
            outcomes.add("completed")
    assert outcomes


def test_a_progress_callback_failing_on_finish_still_returns_the_result(tmp_path, hf_source):
    import converter_core

    def progress(event):
        if event["event"] == "finish":
            raise RuntimeError("the caller's display broke")
    result = converter_core.convert("llama_hf", "llama_hf", hf_source, tmp_path / "out", progress=progress)
    assert_bit_identical(hf_source, result.save_dir)


def test_handle_signals_from_a_thread_is_refused_and_holds_no_lock(tmp_path, hf_source):
    import converter_core
    errors = []

    def run():
        try:
            converter_core.convert("llama_hf", "llama_hf", hf_source, tmp_path / "out", handle_signals=True)
        except converter_core.ConversionError as error:
            errors.append(error)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0]) and errors[0].role == "arguments"
    assert not list(tmp_path.glob(".*lock"))
    result = converter_core.convert("llama_hf", "llama_hf", hf_source, tmp_path / "out")  # not "another conversion"
    assert_bit_identical(hf_source, result.save_dir)


@pytest.mark.parametrize("same", [True, False], ids=["same", "different"])
def test_a_stored_lm_head_of_a_tied_model_is_never_dropped(tmp_path, same):
    source = tmp_path / "hf"
    make_hf_model(source, "tied")
    weights = load_file(source / "model.safetensors")
    embeddings = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = embeddings.clone() if same else embeddings + 1
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    result = convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "out",
                     ok=same)
    if same:
        assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").exists()
    else:
        line = error_line(result)
        assert "lm_head.weight differs from model.embed_tokens.weight" in line and "model.safetensors" in line
        assert_nothing_complete(tmp_path / "out")


STALLING_SAVER = '''
import importlib, os, signal

def add_arguments(parser):
    importlib.import_module("converter_plugins.saver_mcore").add_arguments(parser)

class StopAfterLast:
    def __init__(self, queue):
        self.queue = queue
    def get(self, *a, **k):
        value = self.queue.get(*a, **k)
        if value == "done":
            os.kill(os.getpid(), signal.SIGSTOP)  # every message taken, then stopped
        return value

def save_checkpoint(queue, args):
    importlib.import_module("converter_plugins.saver_mcore").save_checkpoint(StopAfterLast(queue), args)
'''


def test_a_saver_stopped_mid_run_or_after_the_last_message_ends_the_run(tmp_path, hf_source):
    """SIGSTOP: in mid-run (the loader waits on a full queue), and after the saver has taken every message
    (nothing waits on the queue then): the run ends as stalled, the stopped saver is continued so it
    removes its staging, nothing is left."""
    from test_cli_and_plugins import plugin_env
    process, saver_pid = start_paused(tmp_path, hf_source, tmp_path / "mid", "mcore", "--stall-timeout", 1,
                                      "--max-queue-size", 1, forever=False)
    os.kill(saver_pid, signal.SIGSTOP)
    out, err = process.communicate(timeout=120)
    line = error_line(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    assert "stalled" in line and process.returncode == 1, line
    assert_nothing_complete(tmp_path / "mid")
    assert not psutil.pid_exists(saver_pid) or psutil.Process(saver_pid).status() == psutil.STATUS_ZOMBIE

    env = plugin_env(tmp_path, saver_stopping=STALLING_SAVER)
    result = subprocess.run([sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", "llama_hf",
                             "--saver", "stopping", "--load-dir", str(hf_source), "--save-dir", str(tmp_path / "after"),
                             "--stall-timeout", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert "stalled: the saver has been stopped" in error_line(result) and result.returncode == 1
    assert_nothing_complete(tmp_path / "after")


def test_a_saver_killed_by_sigbus_is_told_why(tmp_path, hf_source):
    """A saver that is not ours reading a memory-mapped file cut short dies of SIGBUS: the line says what
    that means (ours catch it on source pages, tests/test_file_refs.py)."""
    from test_cli_and_plugins import plugin_env
    env = plugin_env(tmp_path, saver_bus="import os, signal\n\ndef add_arguments(parser):\n    pass\n\n"
                                         "def save_checkpoint(queue, args):\n    queue.get()\n"
                                         "    os.kill(os.getpid(), signal.SIGBUS)\n")
    result = convert("--loader", "llama_hf", "--saver", "bus", "--load-dir", hf_source, "--save-dir", tmp_path / "out",
                     ok=False, env=env)
    assert "saver was killed by SIGBUS (signal 7): a memory-mapped file it read was cut short" in error_line(result)


def test_args_the_converter_cannot_lay_out_name_their_file(tmp_path, mcore_tp2pp2, hf_source):
    """Found by fuzzing: a switch in a rank file's args or a field of config.json that cannot describe the
    model is refused naming the file it came from."""
    source = tmp_path / "mcore"
    shutil.copytree(mcore_tp2pp2, source)
    for rank in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
        path = source / "iter_0000001" / rank / RANK_FILE
        state = torch.load(path, weights_only=False)
        state["args"].multi_latent_attention = True
        torch.save(state, path)
    line = error_line(convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", source,
                              "--save-dir", tmp_path / "out", ok=False))
    assert f"{source}/iter_0000001/mp_rank_00_000/{RANK_FILE}" in line and "multi-latent attention" in line, line
    hf = tmp_path / "hf"
    shutil.copytree(hf_source, hf)
    config = json.loads((hf / "config.json").read_text())
    config["rms_norm_eps"] = False
    (hf / "config.json").write_text(json.dumps(config))
    line = error_line(convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", hf, "--save-dir",
                              tmp_path / "out2", ok=False))
    assert str(hf / "config.json") in line and "(unexpected" not in line, line
