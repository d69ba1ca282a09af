"""converter_core as a library: convert() with a Result, ConversionError with role and kind, progress
events, cancellation, detect() and supported(); and the command line's progress output."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch

import converter_core
from converter_core import api
from helpers import assert_bit_identical, convert, declared_plugins, error_line, make_hf_model
from minicpm_reference import make_minicpm_folder, minicpm_config
from test_mla import make_model as make_deepseek
from test_faults import SLOW_SAVER, assert_nothing_complete, layers_taken
from test_cli_and_plugins import plugin_env

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api") / "hf"
    make_hf_model(folder, num_hidden_layers=4)
    return folder


def test_round_trip_through_the_api_prints_nothing(tmp_path, source, capfd):
    events, tp, pp = [], 2, 2
    result = converter_core.convert("llama_hf", "mcore", source, tmp_path / "mcore", target_tensor_parallel_size=tp,
                                    target_pipeline_parallel_size=pp, progress=events.append)
    assert isinstance(result, converter_core.Result) and result.save_dir == tmp_path / "mcore"
    assert sorted(map(str, result.files)) == [f"iter_0000001/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt"
                                              for t in range(tp) for p in range(pp)] + ["latest_checkpointed_iteration.txt"]
    assert result.bytes == sum((tmp_path / "mcore" / f).stat().st_size for f in result.files) and result.seconds > 0
    back = converter_core.convert("mcore", "llama_hf", tmp_path / "mcore", tmp_path / "back", checking=True)
    assert_bit_identical(source, tmp_path / "back")
    assert back.warnings == []
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""

    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and events[0]["messages"] == 4 + 3 and events[0]["layers"] == 4
    assert kinds[-1] == "finish" and events[-1]["bytes"] == result.bytes
    written = [e for e in events if e["event"] == "written"]
    assert [e["name"] for e in written] == ["embeddings"] + [f"transformer layer {i}" for i in range(4)] + [
        "final norm", "output layer"]
    assert all(e["bytes"] > 0 for e in written)
    for kind in ("sent", "written"):
        assert [(e["count"], e["total"]) for e in events if e["event"] == kind] == [(n, 7) for n in range(1, 8)]


def test_bad_input_raises_conversion_error(tmp_path):
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "mcore", tmp_path / "missing", tmp_path / "out")
    assert (caught.value.kind, caught.value.role) == ("input", "loader")
    assert str(tmp_path / "missing") in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,message", [
    (dict(target_tensor_parallel_size=0), "argument target_tensor_parallel_size: must be a positive integer, got '0'"),
    (dict(target_tensor_paralel_size=2), "unknown option 'target_tensor_paralel_size'"),
    (dict(checking="no"), "option 'checking' takes True or False")])
def test_options_are_validated_as_the_command_line_does(tmp_path, source, options, message, capfd):
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "mcore", source, tmp_path / "out", **options)
    assert (caught.value.kind, caught.value.role, caught.value.status) == ("input", "arguments", 2)
    assert message in str(caught.value)
    assert capfd.readouterr() == ("", "") and not (tmp_path / "out").exists()


FRAGILE_SAVER = """
def add_arguments(parser):
    pass

def save_checkpoint(queue, args):
    queue.get()
    {}["rotary_base"]
"""


def test_unexpected_plugin_error_is_internal(tmp_path, source, monkeypatch, capfd):
    """A plugin's unexpected exception: kind "internal", status 3, one line that says so, nothing printed."""
    plugin_env(tmp_path, saver_fragile=FRAGILE_SAVER)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "fragile", source, tmp_path / "out", max_queue_size=1)
    assert (caught.value.kind, caught.value.role, caught.value.status) == ("internal", "saver", 3)
    assert str(caught.value) == "KeyError: 'rotary_base' (unexpected; set CONVERTER_CORE_DEBUG=1 for a traceback)"
    assert caught.value.line() == f"saver failed: {caught.value}"  # what the command line prints
    assert capfd.readouterr() == ("", "") and not (tmp_path / "out").exists()


def test_errors_name_the_path_and_read_alike_in_detect_and_convert(tmp_path, source):
    """.path is the file or folder at fault; detect and convert word one cause alike; the message leaves the
    role to .role (the command line says "loader failed: ") and names the API's keywords, not flags."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text('{"model_type": "llama"}')
    for folder, path in ((tmp_path / "missing", tmp_path / "missing"), (tmp_path / "bare", tmp_path / "bare"),
                         (broken, broken / "config.json")):
        with pytest.raises(converter_core.ConversionError) as detecting:
            converter_core.detect(folder)
        with pytest.raises(converter_core.ConversionError) as converting:
            converter_core.convert("llama_hf", "mcore", folder, tmp_path / "out")
        assert str(detecting.value) == str(converting.value) and str(converting.value).startswith(f"{path}: ")
        assert detecting.value.path == converting.value.path == str(path)
        assert converting.value.role == "loader" and converting.value.line() == f"loader failed: {converting.value}"
    assert str(converting.value).startswith(f"{path}: not valid JSON")

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept").write_text("")
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "llama_hf", source, tmp_path / "full")
    assert (caught.value.role, caught.value.path) == ("saver", str(tmp_path / "full"))
    assert str(caught.value) == f"{tmp_path / 'full'}: already exists and is not empty; choose a new save_dir"
    process = convert("--loader", "llama_hf", "--saver", "llama_hf", "--load-dir", source, "--save-dir", tmp_path / "full",
                      ok=False)
    assert error_line(process) == (f"converter_core: error: saver failed: {tmp_path / 'full'}: already exists and is "
                                   "not empty; choose a new --save-dir")

    converter_core.convert("llama_hf", "mcore", source, tmp_path / "mcore", target_tensor_parallel_size=2)
    rank_file = tmp_path / "mcore" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    rank_file.unlink()
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("mcore", "llama_hf", tmp_path / "mcore", tmp_path / "back")
    assert (caught.value.role, caught.value.path) == ("loader", str(rank_file))


def test_unknown_plugin_is_an_argument_error(tmp_path, source):
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("nonesuch", "mcore", source, tmp_path / "out")
    assert caught.value.role == "arguments" and "Unable to load loader plugin nonesuch" in str(caught.value)


NAP = 5  # seconds the slow saver naps on each layer: a run still going when it wakes writes that layer


def test_cancel_stops_the_run_and_a_rerun_succeeds(tmp_path, source, monkeypatch):
    """Cancel is set the moment the saver says it has taken layer 0 (its note event); it then naps NAP seconds
    before writing the layer. A run that stops at once ends inside that nap: no layer is written after the
    cancel, the saver takes no other layer, nothing is left. (A cancel seen only when the run ends would
    let the saver write every layer.)"""
    plugin_env(tmp_path, saver_slow=SLOW_SAVER)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    monkeypatch.setenv("SLOW_SAVER", "mcore")
    cancel, target, events = threading.Event(), tmp_path / "out", []
    shared_memory = set(os.listdir("/dev/shm"))

    def progress(event):  # the relay thread, in order of arrival
        events.append(event)
        if event["event"] == "note" and event["message"].startswith("slow saver ") and not cancel.is_set():
            events.append("cancelled here")
            cancel.set()

    children_before = set(psutil.Process().children(recursive=True))
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "slow", source, target, cancel=cancel, progress=progress, slow_seconds=NAP)
    assert caught.value.kind == "interrupted" and str(caught.value) == "cancelled"
    assert "cancelled here" in events
    after_cancel = events[events.index("cancelled here") + 1:]
    assert not [e for e in after_cancel if e["event"] in ("written", "saved", "finish")], after_cancel
    assert layers_taken(target) == ["transformer layer 0"]
    left = {child for child in set(psutil.Process().children(recursive=True)) - children_before
            if "resource_tracker" not in " ".join(child.cmdline())}  # spawn's tracker lives as long as we do
    assert not left, left
    assert_nothing_complete(target)
    assert set(os.listdir("/dev/shm")) <= shared_memory
    Path(str(target) + ".progress").unlink()
    converter_core.convert("llama_hf", "slow", source, target, slow_seconds=0)
    assert (target / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_progress_json_lines_never_interleave(tmp_path, source):
    for run in range(20):
        process = convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source,
                          "--save-dir", tmp_path / f"out{run}", "--progress", "json")
        events = [json.loads(line) for line in process.stdout.splitlines()]  # every line is one JSON object
        assert events[0]["event"] == "start" and events[-1]["event"] == "finish"
        assert [e["name"] for e in events if e["event"] == "written"] == \
               [e["name"] for e in events if e["event"] == "sent"]
        assert process.stderr == ""


def test_quiet_and_default_output(tmp_path, source):
    quiet = convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "q",
                    "--quiet")
    assert (quiet.stdout, quiet.stderr) == ("", "")
    default = convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "d")
    lines = default.stdout.splitlines()
    files = [p for p in (tmp_path / "d").rglob("*") if p.is_file()]  # TP 1 x PP 1: one rank file and the tracker
    gigabytes = sum(p.stat().st_size for p in files) / 1e9
    assert len(files) == 2 and lines[-1].startswith(f"wrote {tmp_path / 'd'}: {len(files)} files, {gigabytes:.3f} GB in ")
    assert lines[-1].endswith(" GB/s)")
    assert "sending" not in default.stdout and "received" not in default.stdout


def test_version_list_plugins_detect_supported_commands(tmp_path, source):
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "converter_core", *argv], capture_output=True, text=True,
                              timeout=60)
    assert run("--version").stdout == f"converter_core {converter_core.__version__}\n"
    assert run("--list-plugins").stdout == (f"loaders: {', '.join(declared_plugins('loader'))}\n"
                                            f"savers: {', '.join(declared_plugins('saver'))}\n")
    assert json.loads(run("detect", str(source)).stdout)["format"] == "hf"
    assert json.loads(run("supported").stdout) == converter_core.supported()
    missing = run("detect", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and missing.stderr == f"converter_core: error: {tmp_path / 'nowhere'}: no such model folder\n"


def detected(path):
    found = converter_core.detect(path)
    return found.format, found.family, found.tp, found.pp, found.ep, found.vp, found.dtype, found.num_layers, found.loader


def plugins_and_sizes(path):
    found = converter_core.detect(path)
    return ((found.loader, found.saver, found.other_saver, found.other_loader),
            (found.layers, found.hidden_size, found.attention_heads, found.kv_heads, found.experts, found.vocab_size,
             found.parameters, found.bytes))


def model_sizes(model, dtype):
    """What detect() should say of `model` saved in `dtype`, from transformers' own model."""
    config, parameters = model.config, sum(p.numel() for p in model.parameters())  # tied weights counted once
    return (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads, 0,
            config.vocab_size, parameters, parameters * dtype.itemsize)


def test_detect_every_checkpoint_kind(tmp_path):
    models = {}
    for variant in ("llama", "mistral", "qwen2"):
        models[variant] = make_hf_model(tmp_path / variant, variant, dtype=torch.bfloat16, num_hidden_layers=2,
                                        tie_word_embeddings=variant == "qwen2")
        assert detected(tmp_path / variant) == ("hf", variant, 1, 1, 1, None, "bfloat16", 2, "llama_hf")
        assert plugins_and_sizes(tmp_path / variant) == (("llama_hf", "llama_hf", "mcore", "mcore"),
                                                         model_sizes(models[variant], torch.bfloat16))
    make_minicpm_folder(tmp_path / "minicpm", minicpm_config())
    assert detected(tmp_path / "minicpm") == ("hf", "minicpm", 1, 1, 1, None, "bfloat16", 4, "minicpm_hf")
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", tmp_path / "qwen2", "--save-dir", tmp_path / "te",
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    assert detected(tmp_path / "te") == ("mcore", "qwen2", 2, 2, 1, None, "bfloat16", 2, "mcore")
    assert plugins_and_sizes(tmp_path / "te") == (("mcore", "mcore", "llama_hf", "llama_hf"),
                                                  model_sizes(models["qwen2"], torch.bfloat16))  # unpadded, once
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", tmp_path / "mistral", "--save-dir", tmp_path / "dist",
            "--ckpt-format", "torch_dist", "--saver-transformer-impl", "local")
    assert detected(tmp_path / "dist") == ("torch_dist", "mistral", 1, 1, 1, None, "bfloat16", 2, "mcore")
    assert plugins_and_sizes(tmp_path / "dist") == (("mcore", "mcore", "llama_hf", "llama_hf"),
                                                    model_sizes(models["mistral"], torch.bfloat16))
    convert("--loader", "llama_hf", "--saver", "megatron", "--load-dir", tmp_path / "llama", "--save-dir",
            tmp_path / "legacy", "--target-pipeline-parallel-size", 2, "--fp16")
    assert detected(tmp_path / "legacy") == ("legacy", "llama", 1, 2, 1, None, "float16", 2, "megatron")
    assert plugins_and_sizes(tmp_path / "legacy") == (("megatron", "megatron", "llama_hf", "llama_hf"),
                                                      model_sizes(models["llama"], torch.float16))
    convert("--loader", "minicpm_hf", "--saver", "mcore", "--load-dir", tmp_path / "minicpm", "--save-dir",
            tmp_path / "minicpm-mcore", "--target-tensor-parallel-size", 2)
    assert detected(tmp_path / "minicpm-mcore")[:3] == ("mcore", "minicpm", 2)
    assert plugins_and_sizes(tmp_path / "minicpm")[0] == ("minicpm_hf", "minicpm_hf", "mcore", "mcore")
    assert plugins_and_sizes(tmp_path / "minicpm-mcore")[0] == ("mcore", "mcore", "minicpm_hf", "minicpm_hf")
    with pytest.raises(converter_core.ConversionError, match="not a Megatron checkpoint folder"):
        converter_core.detect(tmp_path)


def test_detect_counts_experts_and_float32_tensors(tmp_path):
    """DeepSeek-V3 (MoE, MLA) in bfloat16: its routing bias is float32 in the HF files and in Megatron's."""
    model = make_deepseek(tmp_path / "hf", torch.bfloat16)
    state = model.state_dict()  # untied: each tensor once
    parameters = sum(t.numel() for t in state.values())
    size = sum(t.numel() * (4 if name.endswith("e_score_correction_bias") else 2) for name, t in state.items())
    config = model.config
    expected = (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                config.n_routed_experts, config.vocab_size, parameters, size)
    assert plugins_and_sizes(tmp_path / "hf") == (("hf", "hf", "mcore", "mcore"), expected)
    convert("--loader", "hf", "--saver", "mcore", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "mcore",
            "--target-expert-parallel-size", 2)
    assert plugins_and_sizes(tmp_path / "mcore") == (("mcore", "mcore", "hf", "hf"), expected)
    assert detected(tmp_path / "mcore")[:5] == ("mcore", "deepseek_v3", 1, 1, 2)


def test_supported_matches_the_docs():
    """docs/supported-models.md is `python -m converter_core report`'s Markdown for the installed plugins."""
    from converter_core import report
    assert (REPO / "docs" / "supported-models.md").read_text() == report.markdown(api.supported())


def test_spawn_start_method(tmp_path, source):
    env = dict(os.environ, CONVERTER_CORE_START_METHOD="spawn")
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "m",
            "--target-tensor-parallel-size", 2, env=env)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "m", "--save-dir", tmp_path / "b", env=env)
    assert_bit_identical(source, tmp_path / "b")
