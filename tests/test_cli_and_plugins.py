"""convert.py compatibility: its command lines, its plugin rules (entry points, then loader_<name> /
<name> on sys.path), its message stream; and supervision when a plugin fails."""

import json
import os
import textwrap
import time

import pytest
import torch

from helpers import convert, error_line, make_hf_model, write_tokenizer

RECORDING_SAVER = '''
import json, os

def add_arguments(parser):
    parser.add_argument("--record-file", required=True)

def save_checkpoint(queue, args):
    md = queue.get()
    stream = {"metadata": sorted(vars(md)), "checkpoint_args": sorted(vars(md.checkpoint_args)), "messages": []}
    while True:
        message = queue.get()
        if message == "done":
            break
        stream["messages"].append([message["name"], sorted(k for k in message if k != "name")])
    json.dump(stream, open(args.record_file, "w"))
'''


def plugin_env(tmp_path, **modules):
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    for name, text in modules.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))


def test_convert_py_command_line_from_megatron_docs(tmp_path):
    """docs/llama_mistral.md's command, unchanged apart from the program name."""
    source = tmp_path / "hf"
    make_hf_model(source)
    write_tokenizer(source, 90)  # as convert.py, the tokenizer gives the true vocabulary size
    convert("--loader", "llama_mistral", "--saver", "core", "--checkpoint-type", "hf", "--model-size", "llama3",
            "--load-dir", source, "--save-dir", tmp_path / "out", "--tokenizer-model", source,
            "--target-tensor-parallel-size", 2, "--bf16")
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in (tmp_path / "out" / "iter_0000001").iterdir()) == ["mp_rank_00", "mp_rank_01"]
    state = torch.load(tmp_path / "out" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)
    assert (state["args"].vocab_size, state["args"].padded_vocab_size, state["args"].tokenizer_model) == (90, 256, str(source))
    assert state["model"]["embedding.word_embeddings.weight"].dtype == torch.bfloat16


def test_megatron_style_saver_on_sys_path_sees_megatrons_stream(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, "qwen2", num_hidden_layers=2)
    record = tmp_path / "stream.json"
    convert("--loader", "llama_hf", "--saver", "recording", "--load-dir", source, "--save-dir", tmp_path / "x",
            "--record-file", record, env=plugin_env(tmp_path, saver_recording=RECORDING_SAVER))
    stream = json.loads(record.read_text())
    layer_keys = sorted(["input norm weight", "post norm weight", "qkv weight", "qkv bias", "dense weight",
                         "mlp l0 weight W", "mlp l0 weight V", "mlp l1 weight"])
    assert stream["messages"] == [["embeddings", ["word embeddings"]],
                                  ["transformer layer 0", layer_keys], ["transformer layer 1", layer_keys],
                                  ["final norm", ["weight"]], ["output layer", ["weight"]]]
    for attribute in ["model_type", "num_layers", "hidden_size", "seq_length", "num_attention_heads",
                      "max_position_embeddings", "tokenizer_type", "iteration", "params_dtype", "bert_binary_head",
                      "output_layer", "position_embedding_type", "linear_bias", "qkv_bias", "norm_has_bias",
                      "swiglu", "previous_tensor_parallel_size", "previous_pipeline_parallel_size",
                      "true_vocab_size", "make_vocab_size_divisible_by", "checkpoint_args",
                      "consumed_train_samples", "consumed_valid_samples"]:
        assert attribute in stream["metadata"]
    for attribute in ["sequence_parallel", "apply_query_key_layer_scaling", "num_query_groups",
                      "group_query_attention", "ffn_hidden_size", "kv_channels", "normalization", "norm_epsilon",
                      "rotary_base", "rotary_percent", "swiglu", "add_bias_linear", "add_qkv_bias",
                      "untie_embeddings_and_output_weights", "num_experts", "make_vocab_size_divisible_by"]:
        assert attribute in stream["checkpoint_args"]


def test_bare_module_name_and_third_party_entry_point(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=2)
    env = plugin_env(tmp_path, my_recorder=RECORDING_SAVER)
    convert("--loader", "llama_hf", "--saver", "my_recorder", "--load-dir", source, "--save-dir", tmp_path / "x",
            "--record-file", tmp_path / "a.json", env=env)
    assert (tmp_path / "a.json").exists()
    dist_info = tmp_path / "plugins" / "thirdparty_saver-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-saver\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[converter_core.savers]\nthird = my_recorder\n")
    convert("--loader", "llama_hf", "--saver", "third", "--load-dir", source, "--save-dir", tmp_path / "y",
            "--record-file", tmp_path / "b.json", env=env)
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads((tmp_path / "a.json").read_text())


def test_unknown_plugin(tmp_path):
    process = convert("--loader", "nonesuch", "--saver", "mcore", "--load-dir", tmp_path, "--save-dir", tmp_path / "o",
                      ok=False)
    assert "Unable to load loader plugin nonesuch" in error_line(process)


@pytest.mark.parametrize("failure", ["raise", "exit", "kill"])
def test_failing_saver_stops_the_loader(tmp_path, failure):
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=4)
    action = {"raise": "raise RuntimeError('disk on fire')", "exit": "raise SystemExit('saver gave up')",
              "kill": "os.kill(os.getpid(), signal.SIGKILL)"}[failure]
    saver = f'''
    import os, signal
    def add_arguments(parser):
        pass
    def save_checkpoint(queue, args):
        queue.get(); queue.get()
        {action}
    '''
    started = time.monotonic()
    process = convert("--loader", "llama_hf", "--saver", "broken", "--load-dir", source, "--save-dir", tmp_path / "o",
                      "--max-queue-size", 1, ok=False, timeout=60, env=plugin_env(tmp_path, saver_broken=saver))
    line = error_line(process)
    expected = {"raise": "saver failed: RuntimeError: disk on fire", "exit": "saver failed: saver gave up",
                "kill": "saver was killed by signal 9"}[failure]
    assert expected in line
    assert time.monotonic() - started < 50


def test_failing_loader_stops_the_saver(tmp_path):
    loader = '''
    import types
    def add_arguments(parser):
        pass
    def load_checkpoint(queue, args):
        raise ValueError("cannot read shard 3")
    '''
    process = convert("--loader", "broken", "--saver", "mcore", "--load-dir", tmp_path / "src", "--save-dir", tmp_path / "o",
                      ok=False, timeout=60, env=plugin_env(tmp_path, loader_broken=loader))
    assert "loader failed: ValueError: cannot read shard 3" in error_line(process)
    assert not (tmp_path / "o").exists()


EXTRA_KEY_LOADER = """
import converter_plugins.loader_llama_hf as real

def add_arguments(parser):
    real.add_arguments(parser)

class Tamper:
    def __init__(self, queue):
        self.queue = queue
    def put(self, item, *a, **k):
        if isinstance(item, dict) and item.get("name") == "transformer layer 1":
            item["surprise"] = item["dense weight"]
        self.queue.put(item, *a, **k)

def load_checkpoint(queue, args):
    real.load_checkpoint(Tamper(queue), args)
"""


def test_leftover_keys_fail_unless_no_checking(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=2)
    env = plugin_env(tmp_path, loader_tamper=EXTRA_KEY_LOADER)
    process = convert("--loader", "tamper", "--saver", "llama_hf", "--load-dir", source, "--save-dir", tmp_path / "a",
                      ok=False, env=env)
    assert "unexpected values in transformer layer 1: surprise" in error_line(process)
    assert not (tmp_path / "a").exists()
    convert("--loader", "tamper", "--saver", "llama_hf", "--load-dir", source, "--save-dir", tmp_path / "b",
            "--no-checking", env=env)
    assert (tmp_path / "b" / "config.json").exists()


def test_output_overlapping_the_source_is_refused(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=2)
    before = sorted(p.name for p in source.iterdir())
    for target in (source, source / "inside", tmp_path):
        process = convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target, ok=False)
        assert "overlaps --load-dir" in error_line(process)
    assert sorted(p.name for p in source.iterdir()) == before


def test_loader_ending_without_done_does_not_hang(tmp_path):
    loader = '''
    import types
    def add_arguments(parser):
        pass
    def load_checkpoint(queue, args):
        pass  # returns without sending anything
    '''
    process = convert("--loader", "silent", "--saver", "mcore", "--load-dir", tmp_path / "src", "--save-dir", tmp_path / "o",
                      ok=False, timeout=60, env=plugin_env(tmp_path, loader_silent=loader))
    assert "saver failed: loader exited" in error_line(process)


def test_our_loaders_put_exit_themselves_as_convert_py_expects(tmp_path):
    """Under Megatron's convert.py the loader runs in its main process; a failing loader must still
    release Megatron's saver by putting "exit" on the queue, then raise."""
    import argparse
    import queue as queues
    from converter_plugins import loader_llama_hf, loader_mcore
    parser = argparse.ArgumentParser()
    loader_llama_hf.add_arguments(parser)
    for plugin in (loader_llama_hf, loader_mcore):
        parser = argparse.ArgumentParser(conflict_handler="resolve")
        plugin.add_arguments(parser)
        args = parser.parse_args([])
        args.load_dir, args.checking = str(tmp_path / "missing"), True
        queue = queues.Queue()
        with pytest.raises(Exception):
            plugin.load_checkpoint(queue, args)
        assert queue.get_nowait() == "exit"
