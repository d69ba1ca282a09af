"""A family whose decoder settings sit inside config.json (a multimodal config's "text_config", with
architectures and model_type outside) and whose tensor names carry a prefix, declared as data in a table
importing only converter_core.plugin. The model is transformers' Emu3ForCausalLM (a Llama-like decoder of
the Emu3 family), which reads such a nested config.json itself; its tensors are stored under Emu3's
composite prefix "model.text_model." and loaded with transformers' own key_mapping."""

import argparse
import ast
import json

import torch
import transformers
from safetensors.torch import save_file

from helpers import BASE, assert_bit_identical, convert, error_line, hf_logits, randomize, read_config, tokens_for
from mcore_harness import mcore_logits
from test_cli_and_plugins import plugin_env
from test_open_sdk import ROLE as STARCODER2_ROLE

EMU3_FAMILY = '''
"""Emu3's text decoder: Llama's layer, its config.json under text_config, its tensors under model.text_model."""
from converter_core import plugin

EMU3 = plugin.Family(
    "emu3", ("Emu3ForCausalLM",), config_key="text_config", config={"model_type": "emu3_text_model"},
    outer={"tie_word_embeddings": False}, embedding="model.text_model.embed_tokens.weight",
    final_norm="model.text_model.norm.weight", layers="model.text_model.layers.{}.")
FAMILIES = plugin.by_model_type(EMU3)
'''
ROLE = STARCODER2_ROLE.replace("family_starcoder2", "family_emu3").replace("StarCoder2", "Emu3")
PREFIX = {r"^model\.text_model\.": "model."}  # the stored names -> Emu3ForCausalLM's own
VQ = dict(embed_dim=8, codebook_size=16, latent_channels=8, base_channels=8, channel_multiplier=[1],
          num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=1)


def emu3_source(folder):
    """A nested config.json (Emu3Config: text_config and vq_config) and the decoder's weights, prefixed."""
    text = dict(BASE, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = transformers.Emu3Config(text_config=text, vq_config=VQ)
    config.architectures = ["Emu3ForCausalLM"]
    config.dtype = config.text_config.dtype = torch.float32
    config.save_pretrained(folder)
    torch.manual_seed(0)
    model = randomize(transformers.Emu3ForCausalLM(config.text_config), 0)
    renamed = {("model.text_model." + name.removeprefix("model.") if name.startswith("model.") else name):
               tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})


def load_strictly(folder):
    """Emu3ForCausalLM from `folder` as transformers reads it: every tensor used, none missing."""
    model, info = transformers.Emu3ForCausalLM.from_pretrained(folder, key_mapping=PREFIX, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def test_the_family_is_a_short_table_importing_only_the_sdk():
    imported = [node for node in ast.walk(ast.parse(EMU3_FAMILY)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [(node.module, [a.name for a in node.names]) for node in imported] == [("converter_core", ["plugin"])]


def test_nested_config_to_mcore_tp2_logits_and_back_bit_exact(tmp_path):
    env = plugin_env(tmp_path, family_emu3=EMU3_FAMILY, loader_emu3=ROLE.format(role="loader", entry="load"),
                     saver_emu3=ROLE.format(role="saver", entry="save"))
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    emu3_source(source)
    stored = read_config(source)
    assert "num_hidden_layers" not in stored and stored["text_config"]["num_hidden_layers"] == BASE["num_hidden_layers"]
    model = load_strictly(source)
    assert isinstance(model.config, transformers.Emu3TextConfig)
    convert("--loader", "emu3", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local", env=env)
    tokens = tokens_for(BASE["vocab_size"])
    logits = mcore_logits(megatron / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model, tokens), atol=1e-4, rtol=0)
    convert("--loader", "mcore", "--saver", "emu3", "--load-dir", megatron, "--save-dir", back, env=env)
    assert_bit_identical(source, back)
    assert read_config(back) == stored  # the outer object, vq_config and text_config included
    torch.testing.assert_close(hf_logits(load_strictly(back), tokens), hf_logits(model, tokens), atol=0, rtol=0)


def test_config_json_without_a_stored_one_and_across_families(tmp_path, monkeypatch):
    """A Megatron-made stream (no stored config.json): the decoder's fields go under text_config inside an
    outer object from the family's declarations, and transformers reads them back as the same decoder.
    Across families, the decoder object of the stored config.json is the other family's starting point."""
    from converter_core import hf_family, plugin
    plugin_env(tmp_path, family_emu3=EMU3_FAMILY)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    from family_emu3 import EMU3
    emu3_source(tmp_path / "hf")
    args = hf_family.args_from_config(read_config(tmp_path / "hf"), "config.json", torch.float32, True, EMU3)
    assert json.loads(args.hf_config_json) == read_config(tmp_path / "hf")
    args = argparse.Namespace(**dict(vars(args), hf_config_json=None))
    written = hf_family.config_from_args(args, BASE["vocab_size"], EMU3)
    assert {k: v for k, v in written.items() if k != "text_config"} == {
        "architectures": ["Emu3ForCausalLM"], "model_type": "emu3", "tie_word_embeddings": False}
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "config.json").write_text(json.dumps(written))
    made = transformers.Emu3TextConfig.from_pretrained(tmp_path / "made")
    source = transformers.Emu3TextConfig.from_pretrained(tmp_path / "hf")
    for name in (*BASE, "tie_word_embeddings", "hidden_act", "rope_parameters"):
        assert getattr(made, name) == getattr(source, name), name
    # Written as another family (a flat Llama): the decoder object is its config.json, the outer one is dropped.
    nested = dict(vars(args), hf_config_json=json.dumps(read_config(tmp_path / "hf")))
    llama_family = plugin.Family("llama", ("LlamaForCausalLM",))
    flat = hf_family.config_from_args(argparse.Namespace(**nested), BASE["vocab_size"], llama_family)
    decoder = {k: v for k, v in read_config(tmp_path / "hf")["text_config"].items() if k != "architectures"}
    assert flat == dict(decoder, model_type="llama", architectures=["LlamaForCausalLM"])
    # Another family's stored config (a flat Llama's) gives the decoder's fields, the outer object is Emu3's.
    llama = dict(read_config(tmp_path / "hf")["text_config"], model_type="llama", architectures=["LlamaForCausalLM"])
    args.hf_config_json = json.dumps(llama)
    retargeted = hf_family.config_from_args(args, BASE["vocab_size"], EMU3)
    assert retargeted["model_type"] == "emu3" and retargeted["architectures"] == ["Emu3ForCausalLM"]
    assert "hidden_size" not in retargeted and retargeted["text_config"]["model_type"] == "emu3_text_model"
    kept = {k: v for k, v in llama.items() if k != "architectures"}  # the args agree with every other field
    assert retargeted["text_config"] == dict(kept, model_type="emu3_text_model")


def test_a_missing_or_flat_decoder_object_is_one_line(tmp_path):
    """The family says its decoder's fields are under text_config: a config.json without that object, or
    with something else there, is refused in one line naming config.json, and nothing is written."""
    env = plugin_env(tmp_path, family_emu3=EMU3_FAMILY, loader_emu3=ROLE.format(role="loader", entry="load"),
                     saver_emu3=ROLE.format(role="saver", entry="save"))
    source = tmp_path / "hf"
    emu3_source(source)
    stored = read_config(source)
    for index, text_config in enumerate((None, [1, 2])):
        config = {key: value for key, value in stored.items() if key != "text_config"}
        if text_config is not None:
            config["text_config"] = text_config
        (source / "config.json").write_text(json.dumps(config))
        target = tmp_path / f"out{index}"
        line = error_line(convert("--loader", "emu3", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
                                  ok=False, env=env))
        assert line == (f"converter_core: error: loader failed: {source / 'config.json'}: text_config must be an "
                        f"object holding the decoder's fields, got {text_config}"), line
        assert not target.exists()
