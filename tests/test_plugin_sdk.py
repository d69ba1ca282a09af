"""The plugin SDK as a third party uses it: the example package plugins/converter-phi3 (installed with
pip, as CI does) and a family written in a test, both through converter_core.plugin alone. Checked
against transformers' own Phi3 and Qwen3 models and megatron-core's GPTModel."""

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from helpers import (BASE, assert_bit_identical, convert, error_line, hf_logits, randomize, read_config,
                     read_safetensors_folder, tokens_for)
from mcore_harness import mcore_logits, rank_file
from test_cli_and_plugins import plugin_env

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "plugins" / "converter-phi3"
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_model(folder, config, dtype=torch.float32):
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), 0).eval()
    model.to(dtype).save_pretrained(folder)
    return model.float()


def phi3(folder, dtype=torch.float32, **overrides):
    return make_model(folder, transformers.Phi3Config(**{**BASE, **TOKEN_IDS, **overrides}), dtype)


def test_example_package_is_installed_and_imports_only_the_sdk():
    installed = {(group, e.name): e.value for group in ("converter_core.loaders", "converter_core.savers")
                 for e in importlib.metadata.entry_points(group=group)}
    assert installed[("converter_core.loaders", "phi3_hf")] == "converter_phi3.loader"
    assert installed[("converter_core.savers", "phi3_hf")] == "converter_phi3.saver"
    package = Path(importlib.util.find_spec("converter_phi3").origin).parent
    sources = sorted((EXAMPLE / "converter_phi3").glob("*.py"))
    for path in sources:  # what is installed is this repository's example, as it is now
        assert (package / path.name).read_bytes() == path.read_bytes(), f"reinstall {EXAMPLE}: {path.name} differs"
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("converter_core") or name == "converter_core.plugin", f"{path}: {name}"
    family = (EXAMPLE / "converter_phi3" / "__init__.py").read_text().splitlines()
    assert len(family) <= 30  # the whole family, docstring included


def test_phi3_to_mcore_tp2_logits_and_back_bit_exact(tmp_path):
    """Fused qkv_proj and gate_up_proj split right (megatron-core gives Phi3's logits, with rotary on
    half of each head), and HF -> mcore (TP 2) -> HF gives back every bit and the same config.json."""
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    model = phi3(source, partial_rotary_factor=0.5)
    convert("--loader", "phi3_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local")
    tokens = tokens_for(BASE["vocab_size"])
    logits = mcore_logits(megatron / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model, tokens), atol=1e-4, rtol=0)
    convert("--loader", "mcore", "--saver", "phi3_hf", "--load-dir", megatron, "--save-dir", back)
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)


def test_phi3_bf16_round_trip_tp2_pp2(tmp_path):
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    phi3(source, dtype=torch.bfloat16)
    convert("--loader", "phi3_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2, "--ckpt-format", "torch_dist")
    convert("--loader", "mcore", "--saver", "phi3_hf", "--load-dir", megatron, "--save-dir", back)
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)


def test_llama_saver_writes_a_phi3_stream_as_llama(tmp_path):
    """A family the saver does not know becomes the first of its own that holds the same tensors."""
    source, megatron, llama = tmp_path / "hf", tmp_path / "mcore", tmp_path / "llama"
    model = phi3(source)
    convert("--loader", "phi3_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron, "--save-dir", llama)
    assert read_config(llama)["architectures"] == ["LlamaForCausalLM"] and read_config(llama)["model_type"] == "llama"
    converted = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    tokens = tokens_for(BASE["vocab_size"])
    torch.testing.assert_close(hf_logits(converted, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)
    half = tmp_path / "half"
    phi3(half, partial_rotary_factor=0.5)  # Llama cannot say that: refused, not written wrong
    convert("--loader", "phi3_hf", "--saver", "mcore", "--load-dir", half, "--save-dir", tmp_path / "m2")
    process = convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "m2",
                      "--save-dir", tmp_path / "l2", ok=False)
    assert "rotary_percent 0.5 has no Hugging Face Llama equivalent" in error_line(process)
    assert not (tmp_path / "l2").exists()


QWEN3_FAMILY = """
from converter_core import plugin

QWEN3 = plugin.Family("qwen3", ("Qwen3ForCausalLM",), layer=plugin.LLAMA_LAYER + plugin.QK_NORM,
                      args={"qk_layernorm": True})
FAMILIES = plugin.by_model_type(QWEN3)
"""
ROLE = """
from family_qwen3 import FAMILIES
from converter_core import plugin

def add_arguments(parser):
    plugin.add_hf_{role}_arguments(parser, "Qwen3 {role}")

def {entry}_checkpoint(queue, args):
    plugin.{entry}_hf(queue, args, FAMILIES)
"""


def test_a_family_with_qk_norms_written_in_a_test(tmp_path):
    """q/k norms travel under their documented keys ("q norm weight", "k norm weight"): the Megatron
    side needs nothing from the family. megatron-core's qk_layernorm gives Qwen3's logits."""
    env = plugin_env(tmp_path, family_qwen3=QWEN3_FAMILY, loader_qwen3=ROLE.format(role="loader", entry="load"),
                     saver_qwen3=ROLE.format(role="saver", entry="save"))
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    model = make_model(source, transformers.Qwen3Config(**{**BASE, "head_dim": 32}))  # head_dim != hidden / heads
    convert("--loader", "qwen3", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local", env=env)
    state = torch.load(rank_file(megatron / "iter_0000001", 1, 0, 1), weights_only=False)
    assert state["args"].qk_layernorm is True
    assert torch.equal(state["model"]["decoder.layers.2.self_attention.k_layernorm.weight"],
                       read_safetensors_folder(source)["model.layers.2.self_attn.k_norm.weight"])
    tokens = tokens_for(BASE["vocab_size"])
    logits = mcore_logits(megatron / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model, tokens), atol=1e-4, rtol=0)
    convert("--loader", "mcore", "--saver", "qwen3", "--load-dir", megatron, "--save-dir", back, env=env)
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)
    for saver, expected in (("megatron", "qk_layernorm cannot be written as legacy"),
                            ("llama_hf", "k norm weight, q norm weight has no tensor in llama")):
        process = convert("--loader", "mcore", "--saver", saver, "--load-dir", megatron,
                          "--save-dir", tmp_path / saver, ok=False, env=env)
        assert expected in error_line(process) and not (tmp_path / saver).exists()


@pytest.mark.parametrize("broken,expected", [
    ('layer=plugin.LLAMA_LAYER[:-1]', "mlp l1 weight has no tensor in qwen3"),
    ('layer=plugin.LLAMA_LAYER + (plugin.Tensor("self_attn.q_norm.weight", "q norm weight"),)',
     "qwen3's q norm weight has no place in the model"),
    ('layer=plugin.LLAMA_LAYER + plugin.QK_NORM',  # rows present only with qk_layernorm, which args={} lacks
     "the weights hold tensors that config.json and the qwen3 family's table do not describe, "
     "e.g. model.layers.0.self_attn.k_norm.weight"),
])
def test_a_table_that_does_not_match_the_model_is_one_line(tmp_path, broken, expected):
    family = QWEN3_FAMILY.replace('layer=plugin.LLAMA_LAYER + plugin.QK_NORM,\n', broken + ',\n') \
        .replace('args={"qk_layernorm": True}', 'args={}')
    env = plugin_env(tmp_path, family_qwen3=family, loader_qwen3=ROLE.format(role="loader", entry="load"))
    make_model(tmp_path / "hf", transformers.Qwen3Config(**BASE))
    process = convert("--loader", "qwen3", "--saver", "mcore", "--load-dir", tmp_path / "hf",
                      "--save-dir", tmp_path / "out", ok=False, env=env)
    assert expected in error_line(process) and not (tmp_path / "out").exists()
