"""Multi-latent attention as a family feature (plugin.Mla). A family the project does not ship,
DeepSeek-V2 with dense layers (MLA with rope on interleaved pairs, a SwiGLU MLP), is a table importing
only converter_core.plugin: megatron-core gives transformers' logits and the way back is bit-exact. The
first SDK's spelling, Family(mla=True, rope_interleaved=...), warns once and converts to the same bytes;
an MLA setting that cannot be mapped is one line naming the feature and what to write."""

import ast
import dataclasses
import json
import shutil
import warnings

import pytest
import torch
import transformers

from converter_core import plugin
from helpers import BASE, assert_bit_identical, convert, error_line, hf_logits, randomize, read_config, tokens_for
from mcore_harness import mcore_logits
from test_cli_and_plugins import plugin_env

FEATURE_FAMILY = '''
"""DeepSeek-V2, dense layers: multi-latent attention (rope on interleaved pairs, as Megatron-Core's)
and a SwiGLU MLP."""
from converter_core import plugin

DEEPSEEK_V2 = plugin.Family("deepseek_v2", ("DeepseekV2ForCausalLM",), mla=plugin.Mla(),
                            layer=plugin.MLA_ATTENTION + plugin.LLAMA_MLP, config={"attention_bias": False})
FAMILIES = plugin.by_model_type(DEEPSEEK_V2)
'''
FLAG_FAMILY = FEATURE_FAMILY.replace("mla=plugin.Mla()", "mla=True")
ROLE = '''
from {family} import FAMILIES
from converter_core import plugin

def add_arguments(parser):
    plugin.add_hf_{role}_arguments(parser, "DeepSeek-V2 {role}")

def {entry}_checkpoint(queue, args):
    plugin.{entry}_hf(queue, args, FAMILIES)
'''
# first_k_dense_replace = every layer: no experts; rms_norm_eps 1e-6, as transformers' latent norms have.
DEEPSEEK_V2 = dict(BASE, num_key_value_heads=4, rms_norm_eps=1e-6, q_lora_rank=32, kv_lora_rank=16,
                   qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=BASE["num_hidden_layers"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(plugin env, HF source folder, its model): the plugins `v2` (the feature) and `v2flag` (the boolean)."""
    folder = tmp_path_factory.mktemp("mla_feature")
    modules = {}
    for name, family in (("v2", FEATURE_FAMILY), ("v2flag", FLAG_FAMILY)):
        modules[f"family_{name}"] = family
        modules[f"loader_{name}"] = ROLE.format(family=f"family_{name}", role="loader", entry="load")
        modules[f"saver_{name}"] = ROLE.format(family=f"family_{name}", role="saver", entry="save")
    torch.manual_seed(0)
    config = transformers.DeepseekV2Config(**DEEPSEEK_V2)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), 0).eval()
    model.save_pretrained(folder / "hf")
    return plugin_env(folder, **modules), folder / "hf", model


def files(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_the_family_is_a_table_importing_only_the_sdk():
    imported = [node for node in ast.walk(ast.parse(FEATURE_FAMILY)) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [(node.module, [a.name for a in node.names]) for node in imported] == [("converter_core", ["plugin"])]


def test_feature_logits_in_megatron_core_bit_exact_back_and_the_boolean_writes_the_same_bytes(tmp_path, setup):
    env, source, model = setup
    for name in ("v2", "v2flag"):
        convert("--loader", name, "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / name,
                "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local", env=env)
    feature, flag = files(tmp_path / "v2"), files(tmp_path / "v2flag")
    assert sorted(feature) == sorted(flag) and len(feature) == 3  # tracker and two ranks
    assert all(feature[name] == flag[name] for name in feature)
    args = torch.load(tmp_path / "v2" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    assert (args.multi_latent_attention, args.q_lora_rank, args.kv_lora_rank, args.qk_head_dim, args.qk_pos_emb_head_dim,
            args.v_head_dim, args.rope_type, args.num_experts) == (True, 32, 16, 16, 8, 16, "rope", None)
    tokens = tokens_for(BASE["vocab_size"])
    logits = mcore_logits(tmp_path / "v2" / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model, tokens), atol=1e-4, rtol=0)
    convert("--loader", "mcore", "--saver", "v2", "--load-dir", tmp_path / "v2", "--save-dir", tmp_path / "back", env=env)
    assert_bit_identical(source, tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(source)


def test_the_boolean_warns_once_and_is_the_feature():
    """Family(mla=True, rope_interleaved=X) is Family(mla=Mla(rope_interleaved=X)), field for field (so the
    two convert alike), with one DeprecationWarning saying what to write; copies of it do not warn again."""
    for interleaved in (True, False, "rope_interleave"):
        with pytest.warns(DeprecationWarning) as caught:
            old = plugin.Family("example", ("ExampleForCausalLM",), mla=True, rope_interleaved=interleaved)
        assert len(caught) == 1 and f"mla=plugin.Mla(rope_interleaved={interleaved!r})" in str(caught[0].message)
        assert caught[0].filename == __file__  # it points at the table that uses the boolean
        assert old == plugin.Family("example", ("ExampleForCausalLM",), mla=plugin.Mla(rope_interleaved=interleaved))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert dataclasses.replace(old, model_type="copy").mla == plugin.Mla(rope_interleaved=interleaved)
    assert plugin.Family("example", ("ExampleForCausalLM",), mla=False).mla is None
    with pytest.raises(plugin.ConversionError, match=r"inside mla=plugin\.Mla\(rope_interleaved=\.\.\.\)"):
        plugin.Family("example", ("ExampleForCausalLM",), mla=plugin.Mla(), rope_interleaved=False)


def test_an_mla_setting_it_cannot_map_names_the_feature(tmp_path, setup):
    env, source, _ = setup
    shutil.copytree(source, tmp_path / "hf")
    config = read_config(source)
    del config["kv_lora_rank"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    process = convert("--loader", "v2", "--saver", "mcore", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "out",
                      ok=False, env=env)
    line = error_line(process)
    assert "config.json: multi-latent attention needs kv_lora_rank, got None" in line
    assert "an MLA config.json gives kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim" in line
    assert not (tmp_path / "out").exists()
    # Megatron-Core's MLA computes plain rope or YaRN only: Llama-3 scaling is refused, not dropped.
    llama3 = {"rope_type": "llama3", "factor": 8.0}
    with pytest.raises(plugin.ConversionError, match="rope scaling 'llama3' with multi-latent attention has no "
                                                     "Megatron-Core equivalent"):
        plugin.Mla().rope_args("llama3", llama3, dict(config, rope_scaling=llama3), "config.json", None)
