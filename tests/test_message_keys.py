"""The one table of layer message keys: the protocol's shapes and the Megatron schema agree with it, the
key reference in docs is generated from it, and a key a plugin registers (an attention sink, a [heads]
vector split over TP like the heads) is written by our mcore saver at TP 2 and read back bit-exactly."""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from converter_core import api, orchestrator, protocol
from converter_core.errors import ConversionError
from converter_core.megatron import args as megatron_args, keys as message_keys, schema as megatron_schema

REPO = Path(__file__).resolve().parents[1]

DENSE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
             kv_channels=None, max_position_embeddings=128, norm_epsilon=1e-5, rotary_base=10000.0, vocab_size=96,
             params_dtype=torch.float32)
MODELS = {
    "dense": {},
    "layernorm with biases": dict(normalization="LayerNorm", add_bias_linear=True, swiglu=False, qk_layernorm=True),
    "moe": dict(num_experts=4, moe_layer_freq=[1, 0], moe_shared_expert_intermediate_size=32,
                moe_router_enable_expert_bias=True),
    "mla": dict(multi_latent_attention=True, qk_layernorm=True, q_lora_rank=16, kv_lora_rank=8, qk_head_dim=16,
                qk_pos_emb_head_dim=8, v_head_dim=16, num_query_groups=4),
}


def model_args(**fields):
    return megatron_args.make_args(**{**DENSE, **fields})


@pytest.mark.parametrize("model", MODELS)
def test_every_spec_holds_each_key_of_a_layer_once(model):
    """The schema's parameters, under every spec, hold exactly the keys the protocol checks for."""
    args = model_args(**MODELS[model])
    for index in range(args.num_layers):
        shapes = protocol.layer_message_shapes(args, index)
        for spec in (megatron_schema.LOCAL, megatron_schema.TRANSFORMER_ENGINE, megatron_schema.LEGACY):
            keys = [key for entry in megatron_schema.layer_entries(args, index, spec) for key in entry.keys]
            assert keys == list(shapes), (spec, index)


def test_layer_shapes_follow_the_args():
    moe = model_args(**MODELS["moe"])
    assert protocol.layer_message_shapes(moe, 0)["mlp l0 weight W"] == (4, 96, 64)  # every expert, stacked
    assert protocol.layer_message_shapes(moe, 1)["mlp l0 weight W"] == (96, 64)
    assert "router weight" not in protocol.layer_message_shapes(moe, 1)
    assert protocol.stored_dtype("router expert bias", torch.bfloat16) == torch.float32
    assert protocol.stored_dtype("qkv weight", torch.bfloat16) == torch.bfloat16
    assert protocol.layer_message_shapes(model_args(), 0)["qkv weight"] == ((4 + 2 * 2) * 16, 64)
    # the built-in keys, and those a plugin imported in this process registered (the built-in gpt-oss family's)
    assert set(protocol.LAYER_KEYS) == {key.name for key in message_keys.all_keys()}


def test_key_reference_is_generated_from_the_table():
    """docs/message-keys.md is what scripts/message_keys_doc.py writes (run it after changing the table)."""
    spec = importlib.util.spec_from_file_location("message_keys_doc", REPO / "scripts" / "message_keys_doc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (REPO / "docs" / "message-keys.md").read_text() == script.markdown()


# A plugin package's module registering the key; its loader and saver plugins import it.
ATTENTION_SINKS = '''
from converter_core import plugin

SINK = plugin.LayerKey(
    "attention sink", ("heads",), plugin.COLUMN, "self_attention.core_attention.softmax_offset",
    plugin.Condition("learnable softmax", lambda args, index: getattr(args, "softmax_type", None) == "learnable"),
    "per-head learnable softmax offset")
plugin.register_layer_key(SINK)
'''

# Sends a model with attention sinks, random tensors of exactly the shapes its args imply.
LOADER = '''
import torch
from converter_core import plugin
import attention_sinks  # noqa: F401 (registers the key)

VOCAB = 96


def add_arguments(parser):
    pass


def model_args():
    args = plugin.make_args(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                            num_query_groups=2, kv_channels=None, max_position_embeddings=128, norm_epsilon=1e-5,
                            rotary_base=10000.0, vocab_size=VOCAB, params_dtype=torch.float32,
                            untie_embeddings_and_output_weights=True)
    args.softmax_type = "learnable"
    return args


def messages(args):
    generator = torch.Generator().manual_seed(0)
    yield plugin.EMBEDDINGS, {"word embeddings": torch.randn(VOCAB, 64, generator=generator)}
    for index in range(args.num_layers):
        yield plugin.layer_name(index), {key: torch.randn(shape, generator=generator)
                                         for key, shape in plugin.layer_message_shapes(args, index).items()}
    yield plugin.FINAL_NORM, {"weight": torch.randn(64, generator=generator)}
    yield plugin.OUTPUT_LAYER, {"weight": torch.randn(VOCAB, 64, generator=generator)}


def load_checkpoint(queue, args):
    with plugin.exit_on_failure(queue):
        margs = model_args()
        plugin.send_model(queue, plugin.make_metadata(margs, true_vocab_size=VOCAB), messages(margs))
'''

# Receives any stream and keeps its messages in one file, for the test to compare.
SAVER = '''
import os
import torch
from converter_core import plugin
import attention_sinks  # noqa: F401 (registers the key)


def add_arguments(parser):
    pass


def save_checkpoint(queue, args):
    receiver = plugin.Receiver(queue, args.checking)
    md = receiver.metadata()
    expected = [(plugin.EMBEDDINGS, None)]
    expected += [(plugin.layer_name(index), plugin.layer_message_shapes(md.checkpoint_args, index))
                 for index in range(md.num_layers)]
    expected += [(plugin.FINAL_NORM, None)] + [(plugin.OUTPUT_LAYER, None)] * md.output_layer
    received = {}
    for name, shapes in expected:
        message = receiver.get(name, shapes)
        received[name] = {key: message.pop(key) for key in list(message) if key != "name"}
        receiver.check_consumed(message)
    receiver.done()
    os.makedirs(args.save_dir, exist_ok=True)
    torch.save(received, os.path.join(args.save_dir, "messages.pt"))
'''


@pytest.fixture
def sink_plugins(tmp_path, monkeypatch):
    """The plugin modules on sys.path (their folder, also the sinks loader's load dir); the registration
    they make is undone afterwards."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, source in (("attention_sinks", ATTENTION_SINKS), ("loader_sinks", LOADER), ("saver_capture", SAVER)):
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(message_keys, "_registered", {})
    monkeypatch.setattr(orchestrator, "START_METHOD", "fork")  # whatever the session's; a test may say spawn
    descriptions = dict(message_keys.DESCRIPTIONS)
    yield folder
    message_keys.DESCRIPTIONS.clear()
    message_keys.DESCRIPTIONS.update(descriptions)
    for name in ("attention_sinks", "loader_sinks", "saver_capture"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("fmt,impl,start_method", [("torch", "local", "fork"), ("torch", "transformer_engine", "fork"),
                                                   ("torch_dist", "local", "fork"), ("torch", "local", "spawn")])
def test_a_registered_key_is_written_split_over_tp_and_read_back_bit_exact(tmp_path, sink_plugins, monkeypatch, fmt,
                                                                            impl, start_method):
    """Only the sinks loader and the capture saver register the key, yet the built-in mcore saver (first
    conversion) and loader (second) know it, under spawn too: each side imports both plugin modules."""
    monkeypatch.setattr(orchestrator, "START_METHOD", start_method)
    megatron, back = tmp_path / "mcore", tmp_path / "back"
    api.convert("sinks", "mcore", sink_plugins, megatron, target_tensor_parallel_size=2, ckpt_format=fmt,
                saver_transformer_impl=impl)
    import loader_sinks
    sent = dict(loader_sinks.messages(loader_sinks.model_args()))
    assert protocol.LAYER_KEYS["attention sink"] == "per-head learnable softmax offset"
    if fmt == "torch":  # heads 0-1 on TP rank 0, heads 2-3 on rank 1, in every layer
        for rank in range(2):
            state = torch.load(megatron / f"iter_0000001/mp_rank_0{rank}/model_optim_rng.pt", weights_only=False)
            for index in range(2):
                shard = state["model"][f"decoder.layers.{index}.self_attention.core_attention.softmax_offset"]
                assert torch.equal(shard, sent[f"transformer layer {index}"]["attention sink"][2 * rank:2 * rank + 2])

    api.convert("mcore", "capture", megatron, back)
    received = torch.load(back / "messages.pt", weights_only=True)
    for index in range(2):
        layer = received[f"transformer layer {index}"]
        assert list(layer) == list(sent[f"transformer layer {index}"])
        assert layer["attention sink"].shape == (4,)
        for key, tensor in sent[f"transformer layer {index}"].items():
            assert layer[key].dtype == tensor.dtype and torch.equal(layer[key], tensor), key


def test_a_checkpoint_with_an_unregistered_key_is_refused(tmp_path, sink_plugins):
    """Without the key, our loader refuses the parameter rather than dropping it."""
    megatron = tmp_path / "mcore"
    api.convert("sinks", "mcore", sink_plugins, megatron, target_tensor_parallel_size=2)
    message_keys._registered.clear()  # as in a process that never imported attention_sinks
    with pytest.raises(ConversionError, match="self_attention.core_attention.softmax_offset, a parameter this "
                                                  "converter does not carry"):
        api.convert("mcore", "mcore", megatron, tmp_path / "again")


def test_registration_refuses_what_the_table_cannot_hold():
    before = message_keys.all_keys()
    with pytest.raises(ConversionError, match="'qkv weight' is a built-in message key"):
        message_keys.register_layer_key(message_keys.LayerKey("qkv weight", ("hidden",), message_keys.ROW, "x.weight"))
    with pytest.raises(ConversionError, match="unknown dimensions"):
        message_keys.register_layer_key(message_keys.LayerKey("gate", ("gates",), message_keys.ROW, "gate.weight"))
    assert message_keys.all_keys() == before
