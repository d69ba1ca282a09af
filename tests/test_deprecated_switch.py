"""The first SDK's Family(mup=True) still works: the core keeps no family's switch, the MiniCPM plugin
registers `mup` as its features (MuP, Rope), and a third-party table using the boolean is that family, with
one DeprecationWarning saying what to write."""

import dataclasses
import warnings

import pytest
import torch

from converter_core import plugin
from helpers import assert_bit_identical, convert, read_config
from minicpm_reference import make_minicpm_folder, minicpm_config
from test_cli_and_plugins import plugin_env

# A first-SDK plugin's table: imports only the SDK, muP and LongRoPE by the boolean.
OLD_TABLE = """
    from converter_core import plugin

    FAMILIES = plugin.by_model_type(plugin.Family("minicpm", ("MiniCPMForCausalLM",), tied_by_default=True, mup=True))
    MODEL_TYPES = ("GPT",)
"""
LOADER = OLD_TABLE + """
    def add_arguments(parser):
        plugin.add_hf_loader_arguments(parser, "first-SDK MiniCPM loader")

    def load_checkpoint(queue, args):
        plugin.load_hf(queue, args, FAMILIES)
"""
SAVER = OLD_TABLE + """
    def add_arguments(parser):
        plugin.add_hf_saver_arguments(parser, "first-SDK MiniCPM saver")

    def save_checkpoint(queue, args):
        plugin.save_hf(queue, args, FAMILIES)
"""


def test_the_boolean_warns_once_and_is_the_features():
    from converter_plugins import minicpm
    with pytest.warns(DeprecationWarning) as caught:
        old = plugin.Family("example", ("ExampleForCausalLM",), tied_by_default=True, mup=True)
    assert len(caught) == 1 and "features=converter_plugins.minicpm.FEATURES" in str(caught[0].message)
    assert caught[0].filename == __file__  # it points at the table that uses the boolean
    assert old == plugin.Family("example", ("ExampleForCausalLM",), tied_by_default=True, features=minicpm.FEATURES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataclasses.replace(old, model_type="copy").features == minicpm.FEATURES
        assert plugin.Family("example", ("ExampleForCausalLM",), mup=False) == plugin.Family("example", ("ExampleForCausalLM",))
    with pytest.raises(TypeError, match="no_such_switch"):
        plugin.Family("example", ("ExampleForCausalLM",), no_such_switch=True)


def test_a_first_sdk_plugin_with_the_boolean_converts_minicpm_both_ways(tmp_path):
    """Its loader is imported before any built-in plugin (the switch is found all the same): the muP
    scalars and LongRoPE reach the Megatron args, and the way back gives every bit and config.json."""
    env = plugin_env(tmp_path, loader_oldmini=LOADER, saver_oldmini=SAVER)
    config = minicpm_config(tied=True)
    make_minicpm_folder(tmp_path / "hf", config, dtype=torch.bfloat16)
    convert("--loader", "oldmini", "--saver", "mcore", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "mcore",
            env=env)
    args = torch.load(next((tmp_path / "mcore").glob("iter_*/mp_rank_00/model_optim_rng.pt")), weights_only=False)["args"]
    assert (args.scale_emb, args.scale_depth, args.dim_model_base) == tuple(config[name] for name in
                                                                             ("scale_emb", "scale_depth", "dim_model_base"))
    assert args.rope_scaling_type == "longrope" and list(args.long_factor) == config["rope_scaling"]["long_factor"]
    convert("--loader", "mcore", "--saver", "oldmini", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "back",
            env=env)
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(tmp_path / "hf")
