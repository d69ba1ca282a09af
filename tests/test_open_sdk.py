"""The SDK describes a decoder family the project does not ship, as data: StarCoder2's layout
(LayerNorm with biases, the final norm's too; a non-gated tanh-GELU MLP; biases on every projection)
in a table importing only converter_core.plugin. megatron-core gives transformers' logits, and the
round trip gives back every bit."""

import ast

import torch
import transformers

from safetensors.torch import load_file, save_file

from helpers import (BASE, assert_bit_identical, convert, error_line, hf_logits, make_hf_model, randomize, read_config,
                     tokens_for)
from mcore_harness import mcore_logits
from test_cli_and_plugins import plugin_env

STARCODER2_FAMILY = '''
"""StarCoder2: LayerNorm (with biases) before attention, MLP and the head; a plain tanh-GELU MLP
(c_fc, c_proj); biases on every projection when use_bias (Megatron's add_bias_linear)."""
from converter_core import plugin

BIASED = dict(when="add_bias_linear")
Q, K, V = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")
LAYER = (
    plugin.Tensor("input_layernorm.weight", "input norm weight"),
    plugin.Tensor("input_layernorm.bias", "input norm bias"),
    plugin.Tensor((Q + "weight", K + "weight", V + "weight"), "qkv weight", plugin.QKV),
    plugin.Tensor((Q + "bias", K + "bias", V + "bias"), "qkv bias", plugin.QKV, **BIASED),
    plugin.Tensor("self_attn.o_proj.weight", "dense weight"),
    plugin.Tensor("self_attn.o_proj.bias", "dense bias", **BIASED),
    plugin.Tensor("post_attention_layernorm.weight", "post norm weight"),
    plugin.Tensor("post_attention_layernorm.bias", "post norm bias"),
    plugin.Tensor("mlp.c_fc.weight", "mlp l0 weight"),
    plugin.Tensor("mlp.c_fc.bias", "mlp l0 bias", **BIASED),
    plugin.Tensor("mlp.c_proj.weight", "mlp l1 weight"),
    plugin.Tensor("mlp.c_proj.bias", "mlp l1 bias", **BIASED),
)
STARCODER2 = plugin.Family(
    "starcoder2", ("Starcoder2ForCausalLM",), layer=LAYER, tied_by_default=True, features=(),
    norm=plugin.Norm("LayerNorm", epsilon=("norm_epsilon",), default_epsilon=1e-5),
    activation=plugin.Activation(("gelu_pytorch_tanh",), gated=False),
    fields={"use_bias": "add_bias_linear"})
FAMILIES = plugin.by_model_type(STARCODER2)
'''
ROLE = '''
from family_starcoder2 import FAMILIES
from converter_core import plugin

def add_arguments(parser):
    plugin.add_hf_{role}_arguments(parser, "StarCoder2 {role}")

def {entry}_checkpoint(queue, args):
    plugin.{entry}_hf(queue, args, FAMILIES)
'''


def starcoder2_env(tmp_path):
    return plugin_env(tmp_path, family_starcoder2=STARCODER2_FAMILY,
                      loader_starcoder2=ROLE.format(role="loader", entry="load"),
                      saver_starcoder2=ROLE.format(role="saver", entry="save"))


def starcoder2(folder, **overrides):
    fields = {key: value for key, value in BASE.items() if key != "rms_norm_eps"}
    config = transformers.Starcoder2Config(**fields, norm_epsilon=1e-5, use_bias=True, tie_word_embeddings=False,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2, **overrides)
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), 0).eval()
    model.save_pretrained(folder)
    return model


def test_the_family_is_a_short_table_importing_only_the_sdk():
    imported = [node for node in ast.walk(ast.parse(STARCODER2_FAMILY)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [(node.module, [a.name for a in node.names]) for node in imported] == [("converter_core", ["plugin"])]
    assert len(STARCODER2_FAMILY.strip().splitlines()) <= 40


def test_layernorm_gelu_tanh_biases_to_mcore_tp2_logits_and_back_bit_exact(tmp_path):
    env = starcoder2_env(tmp_path)
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    model = starcoder2(source)
    assert read_config(source)["hidden_act"] == "gelu_pytorch_tanh"
    convert("--loader", "starcoder2", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local", env=env)
    tokens = tokens_for(BASE["vocab_size"])
    logits = mcore_logits(megatron / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model, tokens), atol=1e-4, rtol=0)
    convert("--loader", "mcore", "--saver", "starcoder2", "--load-dir", megatron, "--save-dir", back, env=env)
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)
    # A Llama cannot hold it: one line naming the features that differ, nothing written.
    process = convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron,
                      "--save-dir", tmp_path / "llama", ok=False, env=env)
    line = error_line(process)
    assert "normalization LayerNorm (llama has RMSNorm" in line and "activation gelu_tanh (llama has gated silu)" in line
    assert not (tmp_path / "llama").exists()


def test_an_activation_the_family_does_not_map_is_one_line_saying_what_to_declare(tmp_path):
    starcoder2(tmp_path / "hf", hidden_act="relu")
    process = convert("--loader", "starcoder2", "--saver", "mcore", "--load-dir", tmp_path / "hf",
                      "--save-dir", tmp_path / "out", ok=False, env=starcoder2_env(tmp_path))
    line = error_line(process)
    assert "hidden_act 'relu' is not one starcoder2 maps (gelu_pytorch_tanh)" in line
    assert "activation=Activation(('relu',), gated=...)" in line and not (tmp_path / "out").exists()


PROTOCOL_LOADER = '''
"""A loader speaking the message protocol itself, with converter_core.plugin's names as of the first SDK."""
import torch
from converter_core import plugin

def add_arguments(parser):
    parser.add_argument("--seed", type=int, default=0)

def load_checkpoint(queue, args):
    with plugin.exit_on_failure(queue):
        margs = plugin.make_args(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                                 num_query_groups=2, kv_channels=16, max_position_embeddings=64, norm_epsilon=1e-5,
                                 rotary_base=10000.0, vocab_size=128, params_dtype=torch.float32)
        md = plugin.make_metadata(margs, true_vocab_size=128)
        generator = torch.Generator().manual_seed(args.seed)
        def random(shape):
            return torch.randn(shape, generator=generator)
        layers = ((plugin.layer_name(i), {k: random(s) for k, s in plugin.layer_message_shapes(margs, i).items()})
                  for i in range(margs.num_layers))
        plugin.send_model(queue, md, [(plugin.EMBEDDINGS, {"word embeddings": random((128, 64))}), *layers,
                                      (plugin.FINAL_NORM, {"weight": random((64,))})])
'''
PROTOCOL_SAVER = '''
"""A saver speaking the protocol itself: it stores every tensor it receives in one torch file."""
import torch
from converter_core import plugin

def add_arguments(parser):
    pass

def save_checkpoint(queue, args):
    receiver = plugin.Receiver(queue, args.checking)
    md = receiver.metadata()
    tensors = {}
    def keep(name, message):
        tensors.update((f"{name}/{key}", message.pop(key)) for key in list(message) if key != "name")
        receiver.check_consumed(message)
    keep(plugin.EMBEDDINGS, receiver.get(plugin.EMBEDDINGS))
    for index in range(md.num_layers):
        name = plugin.layer_name(index)
        keep(name, receiver.get(name, plugin.layer_message_shapes(md.checkpoint_args, index)))
    keep(plugin.FINAL_NORM, receiver.get(plugin.FINAL_NORM))
    receiver.done()
    folder = plugin.StagedFolder(args.save_dir)
    torch.save(tensors, folder.path / "tensors.pt")
    folder.commit()
'''


def test_a_plugin_speaking_the_protocol_itself_with_the_first_sdk_names_still_works(tmp_path):
    """Its own load_checkpoint / save_checkpoint, as Megatron's plugins have: through our mcore saver at TP 2
    and our mcore loader, every tensor comes back bit for bit."""
    env = plugin_env(tmp_path, loader_protocol_example=PROTOCOL_LOADER, saver_protocol_example=PROTOCOL_SAVER)
    unused = tmp_path / "plugins"  # the loader makes its model; --load-dir is required all the same
    convert("--loader", "protocol_example", "--saver", "protocol_example", "--load-dir", unused,
            "--save-dir", tmp_path / "direct", env=env)
    convert("--loader", "protocol_example", "--saver", "mcore", "--load-dir", unused, "--save-dir", tmp_path / "mcore",
            "--target-tensor-parallel-size", 2, env=env)
    convert("--loader", "mcore", "--saver", "protocol_example", "--load-dir", tmp_path / "mcore",
            "--save-dir", tmp_path / "back", env=env)
    sent, back = (torch.load(tmp_path / name / "tensors.pt") for name in ("direct", "back"))
    assert sorted(sent) == sorted(back) and len(sent) == 2 + 2 * 7
    for name, tensor in sent.items():  # the vocabulary comes back padded for TP 2, as Megatron keeps it
        assert torch.equal(back[name][:len(tensor)], tensor), name


IGNORING_FAMILY = '''
from converter_core import plugin
FAMILIES = plugin.by_model_type(plugin.Family("llama", ("LlamaForCausalLM",), ignored=("*.attn.cache",)))
'''
IGNORING_LOADER = '''
from family_ignoring import FAMILIES
from converter_core import plugin

def add_arguments(parser):
    plugin.add_hf_loader_arguments(parser, "Llama loader that skips a cache")

def load_checkpoint(queue, args):
    plugin.load_hf(queue, args, FAMILIES)
'''


def test_a_stored_tensor_is_skipped_only_when_the_family_ignores_it(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=2)
    weights = load_file(source / "model.safetensors")
    save_file(dict(weights, **{"model.layers.1.attn.cache": torch.zeros(4)}), source / "model.safetensors",
              metadata={"format": "pt"})
    env = plugin_env(tmp_path, family_ignoring=IGNORING_FAMILY, loader_ignoring=IGNORING_LOADER)
    refused = convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "a",
                      ok=False, env=env)
    assert "do not describe, e.g. model.layers.1.attn.cache" in error_line(refused) and not (tmp_path / "a").exists()
    convert("--loader", "ignoring", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "b", env=env)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "b", "--save-dir", tmp_path / "back")
    assert read_config(tmp_path / "back")["num_hidden_layers"] == 2
    assert sorted(load_file(tmp_path / "back" / "model.safetensors")) == sorted(weights)
