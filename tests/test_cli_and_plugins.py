"""convert.py compatibility: its command lines, its plugin rules (entry points, then loader_<name> /
<name> on sys.path), its message stream; and supervision when a plugin fails."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from helpers import (assert_bit_identical, convert, declared_plugins, error_line, hf_logits, make_hf_model, read_config,
                     tokens_for, write_tokenizer)

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
    multiple = 128 * 2  # Megatron pads to --make-vocab-size-divisible-by (default 128) x TP
    padded = -(-90 // multiple) * multiple
    assert (state["args"].vocab_size, state["args"].padded_vocab_size, state["args"].tokenizer_model) == (90, padded, str(source))
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


UNEXPECTED = "(unexpected; set CONVERTER_CORE_DEBUG=1 for a traceback)"


@pytest.mark.parametrize("failure", ["raise", "raise-debug", "exit", "kill"])
def test_failing_saver_stops_the_loader(tmp_path, failure):
    """A plugin's unexpected exception is an internal error: exit status 3 and one line saying so, with a
    traceback only under CONVERTER_CORE_DEBUG=1; a plugin that gives up or is killed is status 1. The
    loader, blocked on a queue of one message, is stopped (else the run would not end)."""
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=4)
    action = {"raise": "raise RuntimeError('disk on fire')", "raise-debug": "raise RuntimeError('disk on fire')",
              "exit": "raise SystemExit('saver gave up')", "kill": "os.kill(os.getpid(), signal.SIGKILL)"}[failure]
    saver = f'''
    import os, signal
    def add_arguments(parser):
        pass
    def save_checkpoint(queue, args):
        queue.get(); queue.get()
        {action}
    '''
    env = plugin_env(tmp_path, saver_broken=saver)
    if failure == "raise-debug":
        env["CONVERTER_CORE_DEBUG"] = "1"
    process = convert("--loader", "llama_hf", "--saver", "broken", "--load-dir", source, "--save-dir", tmp_path / "o",
                      "--max-queue-size", 1, ok=False, timeout=60, env=env)
    if failure == "raise-debug":
        lines = [line for line in process.stderr.splitlines() if line.startswith("converter_core: error:")]
        assert len(lines) == 1, process.stderr
        line = lines[0]
        assert "Traceback (most recent call last)" in process.stderr and "RuntimeError: disk on fire\n" in process.stderr
        assert "save_checkpoint" in process.stderr  # the plugin's own frame
    else:
        line = error_line(process)  # no traceback
    expected = {"raise": f"saver failed: RuntimeError: disk on fire {UNEXPECTED}",
                "raise-debug": f"saver failed: RuntimeError: disk on fire {UNEXPECTED}",
                "exit": "saver failed: saver gave up", "kill": "saver was killed by signal 9"}[failure]
    assert line.endswith(expected), line
    assert process.returncode == (3 if failure.startswith("raise") else 1)
    assert not (tmp_path / "o").exists()


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


# A loader that keeps Megatron-LM's contract exactly as tools/checkpoint/loader_core.py does: the
# metadata attributes of loader_base.build_checkpoint_metadata, checkpoint_args as Megatron-LM writes
# them today (the fixture Namespace, real AttnBackend and signal.Signals), the padded vocabulary,
# grouped QKV and SwiGLU halves, "exit" before re-raising on failure, "done" twice.
MEGATRON_CONTRACT_LOADER = '''
import types
import torch
from safetensors.torch import load_file
from mcore_harness import megatron_lm_args

def add_arguments(parser):
    parser.add_argument("--fail-at-layer", type=int, default=None)

def load_checkpoint(queue, args):
    try:
        _load(queue, args)
    except:
        queue.put("exit")
        raise

def _load(queue, args):
    hf = load_file(f"{args.load_dir}/model.safetensors")
    layers, hidden, heads, groups, ffn, vocab = 4, 64, 4, 2, 160, 96
    d = hidden // heads
    margs = megatron_lm_args()
    for name, value in dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                            num_query_groups=groups, group_query_attention=True, kv_channels=d, seq_length=256,
                            max_position_embeddings=256, layernorm_epsilon=1e-5, rotary_base=10000, vocab_size=vocab,
                            padded_vocab_size=128, untie_embeddings_and_output_weights=True,
                            tensor_model_parallel_size=1, pipeline_model_parallel_size=1, params_dtype=torch.float32,
                            bf16=False, fp16=False).items():
        setattr(margs, name, value)
    md = types.SimpleNamespace(
        model_type="GPT", num_layers=layers, hidden_size=hidden, seq_length=256, num_attention_heads=heads,
        max_position_embeddings=256, tokenizer_type=margs.tokenizer_type, iteration=10, params_dtype=torch.float32,
        bert_binary_head=False, output_layer=True, position_embedding_type="rope", linear_bias=False,
        qkv_bias=False, norm_has_bias=False, swiglu=True, previous_tensor_parallel_size=1,
        previous_pipeline_parallel_size=1, true_vocab_size=vocab, make_vocab_size_divisible_by=128,
        checkpoint_args=margs)
    md.consumed_train_samples, md.consumed_valid_samples = 0, 0
    queue.put(md)

    def padded(table):
        return torch.cat([table, torch.zeros(128 - vocab, hidden)])

    def send(name, message):
        message["name"] = name
        queue.put(message)

    send("embeddings", {"word embeddings": padded(hf["model.embed_tokens.weight"])})
    for i in range(layers):
        if i == args.fail_at_layer:
            raise ValueError(f"layer {i} is unreadable")
        p = f"model.layers.{i}."
        q = hf[p + "self_attn.q_proj.weight"].view(groups, heads // groups * d, hidden)
        k = hf[p + "self_attn.k_proj.weight"].view(groups, d, hidden)
        v = hf[p + "self_attn.v_proj.weight"].view(groups, d, hidden)
        send(f"transformer layer {i}", {
            "input norm weight": hf[p + "input_layernorm.weight"], "post norm weight": hf[p + "post_attention_layernorm.weight"],
            "qkv weight": torch.cat([q, k, v], dim=1).reshape(-1, hidden), "dense weight": hf[p + "self_attn.o_proj.weight"],
            "mlp l0 weight W": hf[p + "mlp.gate_proj.weight"], "mlp l0 weight V": hf[p + "mlp.up_proj.weight"],
            "mlp l1 weight": hf[p + "mlp.down_proj.weight"]})
    send("final norm", {"weight": hf["model.norm.weight"]})
    send("output layer", {"weight": padded(hf["lm_head.weight"])})
    queue.put("done")
    queue.put("done")
'''

# A saver that reads the stream as tools/checkpoint/saver_core.py (saver_base) does: the md attributes it
# builds its argv from, checkpoint_args' sequence_parallel / apply_query_key_layer_scaling and today's
# layernorm_epsilon, queue_get with "exit", check_message popping every key; then writes HF tensors.
MEGATRON_CONTRACT_SAVER = '''
import sys
import torch
from safetensors.torch import save_file

def add_arguments(parser):
    parser.add_argument("--out-file", required=True)

def save_checkpoint(queue, args):
    def queue_get(name=None):
        value = queue.get()
        if value == "exit":
            print("Loader exited, exiting saver")
            sys.exit(1)
        if name is not None and args.checking and value["name"] != name:
            print(f"Unexpected message. Expecting {name} but got {value['name']}. Exiting saver.")
            sys.exit(1)
        return value

    def check_message(msg):
        name = msg.pop("name")
        if args.checking and msg:
            print(f"Unexpected values in {name}: {sorted(msg)}")
            sys.exit(1)

    md = queue_get()
    argv = [md.num_layers, md.hidden_size, md.seq_length, getattr(md, "num_experts", 0), md.num_attention_heads,
            md.max_position_embeddings, md.position_embedding_type, md.tokenizer_type, md.make_vocab_size_divisible_by,
            md.params_dtype, md.output_layer, md.linear_bias, md.bert_binary_head, md.previous_tensor_parallel_size,
            md.previous_pipeline_parallel_size, md.true_vocab_size, md.iteration]
    margs = md.checkpoint_args
    margs.sequence_parallel, margs.apply_query_key_layer_scaling
    heads, hidden, d = md.num_attention_heads, md.hidden_size, margs.kv_channels
    groups = margs.num_query_groups if margs.group_query_attention else heads
    assert margs.layernorm_epsilon == 1e-5, margs.layernorm_epsilon
    out = {}
    msg = queue_get("embeddings")
    out["model.embed_tokens.weight"] = msg.pop("word embeddings")[:md.true_vocab_size]
    check_message(msg)
    for i in range(md.num_layers):
        msg = queue_get(f"transformer layer {i}")
        p = f"model.layers.{i}."
        qkv = msg.pop("qkv weight").view(groups, (heads // groups + 2) * d, hidden)
        q, k, v = torch.split(qkv, [heads // groups * d, d, d], dim=1)
        out.update({p + "input_layernorm.weight": msg.pop("input norm weight"),
                    p + "post_attention_layernorm.weight": msg.pop("post norm weight"),
                    p + "self_attn.q_proj.weight": q.reshape(-1, hidden), p + "self_attn.k_proj.weight": k.reshape(-1, hidden),
                    p + "self_attn.v_proj.weight": v.reshape(-1, hidden), p + "self_attn.o_proj.weight": msg.pop("dense weight"),
                    p + "mlp.gate_proj.weight": msg.pop("mlp l0 weight W"), p + "mlp.up_proj.weight": msg.pop("mlp l0 weight V"),
                    p + "mlp.down_proj.weight": msg.pop("mlp l1 weight")})
        check_message(msg)
    msg = queue_get("final norm")
    out["model.norm.weight"] = msg.pop("weight")
    check_message(msg)
    if md.output_layer:
        msg = queue_get("output layer")
        out["lm_head.weight"] = msg.pop("weight")[:md.true_vocab_size]
        check_message(msg)
    assert queue_get() == "done"
    save_file({name: t.contiguous() for name, t in out.items()}, args.out_file)
'''


def contract_env(tmp_path):
    env = plugin_env(tmp_path, loader_megatron_contract=MEGATRON_CONTRACT_LOADER,
                     saver_megatron_contract=MEGATRON_CONTRACT_SAVER)
    env["PYTHONPATH"] += os.pathsep + str(Path(__file__).resolve().parent)
    return env


def test_megatron_contract_loader_into_our_savers(tmp_path):
    source = tmp_path / "hf"
    model = make_hf_model(source, num_hidden_layers=4, intermediate_size=160)
    env = contract_env(tmp_path)
    process = convert("--loader", "megatron_contract", "--saver", "llama_hf", "--load-dir", source,
                      "--save-dir", tmp_path / "out", env=env)
    assert "stevedore" not in process.stderr and "Could not load" not in process.stderr  # (megatron warns on import)
    assert_bit_identical(source, tmp_path / "out")
    assert read_config(tmp_path / "out")["rms_norm_eps"] == 1e-5
    tokens = tokens_for(96)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(back, tokens), hf_logits(model, tokens), atol=0, rtol=0)
    convert("--loader", "megatron_contract", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "mcore",
            "--target-tensor-parallel-size", 2, env=env)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "again")
    assert_bit_identical(source, tmp_path / "again")


@pytest.mark.parametrize("loader", ["llama_hf", "mcore"])
def test_our_loaders_into_a_megatron_contract_saver(tmp_path, loader):
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=4, intermediate_size=160)
    if loader == "mcore":
        convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "mcore",
                "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    load_dir = source if loader == "llama_hf" else tmp_path / "mcore"
    process = convert("--loader", loader, "--saver", "megatron_contract", "--load-dir", load_dir, "--save-dir", tmp_path / "x",
                      "--out-file", tmp_path / "out.safetensors", env=contract_env(tmp_path))
    assert process.stderr == ""  # no warning from plugin discovery or anything else
    (tmp_path / "out").mkdir()
    (tmp_path / "out.safetensors").rename(tmp_path / "out" / "model.safetensors")
    assert_bit_identical(source, tmp_path / "out")


@pytest.mark.parametrize("saver", ["llama_hf", "mcore", "megatron_contract"])
def test_foreign_loader_failure_is_the_loaders(tmp_path, saver):
    """Megatron's loaders put "exit" and then raise; the saver stops on "exit", but the loader's error is the cause."""
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=4, intermediate_size=160)
    extra = ["--out-file", tmp_path / "x.safetensors"] if saver == "megatron_contract" else []
    for attempt in range(3):
        process = convert("--loader", "megatron_contract", "--saver", saver, "--load-dir", source,
                          "--save-dir", tmp_path / f"out{attempt}", "--fail-at-layer", 2, *extra,
                          ok=False, env=contract_env(tmp_path))
        assert "loader failed: ValueError: layer 2 is unreadable" in error_line(process)
        assert not (tmp_path / f"out{attempt}").exists() and not (tmp_path / "x.safetensors").exists()


def test_help_alone_and_with_plugins():
    installed = (f"Installed loaders: {', '.join(declared_plugins('loader'))}. "
                 f"Installed savers: {', '.join(declared_plugins('saver'))}.")
    for flags, present in ((["--help"], ["--load-dir", "--target-tensor-parallel-size", installed]),
                           (["--loader", "llama_hf", "--saver", "mcore", "--help"], ["--model-size", "--ckpt-format"])):
        process = subprocess.run([sys.executable, "-m", "converter_core", *flags], capture_output=True, text=True,
                                 timeout=60)
        assert process.returncode == 0, process.stderr
        text = " ".join(process.stdout.split())
        for word in present:
            assert word in text


def test_max_queue_size_zero_is_unbounded(tmp_path):
    make_hf_model(tmp_path / "hf", num_hidden_layers=2)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "m",
            "--max-queue-size", 0)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "m", "--save-dir", tmp_path / "back",
            "--max-queue-size", 0)
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")


@pytest.mark.parametrize("loader,saver", [("llama_hf", "mcore"), ("mcore", "llama_hf"), ("llama_hf", "megatron")])
def test_bert_is_refused_by_gpt_plugins(tmp_path, loader, saver):
    make_hf_model(tmp_path / "hf", num_hidden_layers=2)
    command = [sys.executable, "-m", "converter_core", "--model-type", "BERT", "--loader", loader, "--saver", saver,
               "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "out"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert "converts GPT models only" in error_line(process) and "--model-type BERT" in error_line(process)
    assert process.returncode == 1 and not (tmp_path / "out").exists()


def test_model_size_takes_convert_py_choices(tmp_path):
    make_hf_model(tmp_path / "hf", num_hidden_layers=2)
    process = convert("--loader", "llama_mistral", "--saver", "mcore", "--load-dir", tmp_path / "hf",
                      "--save-dir", tmp_path / "out", "--model-size", "llama9-1T", ok=False)
    assert process.returncode == 2 and "invalid choice: 'llama9-1T'" in process.stderr
    assert not (tmp_path / "out").exists()
