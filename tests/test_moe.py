"""Mixture-of-experts and qk-norm families (Mixtral, Qwen3, Qwen3-MoE) through the generic `hf` plugins:
megatron-core's GPTModel with the converted experts gives transformers' logits; HF -> mcore (TP 2, PP 2,
EP 2) -> HF is bit-exact; expert parallelism writes Megatron-LM's mp_rank_TT[_PPP]_EEE folders."""

import json

import pytest
import torch
import transformers

from megatron.core.enums import ModelType

from dist_harness import dist_logits, save_dist_checkpoint
from helpers import (BASE, assert_bit_identical, convert, error_line, hf_logits, randomize, read_config,
                     read_safetensors_folder, tokens_for)
from mcore_harness import mcore_logits

VOCAB = BASE["vocab_size"]
MIXTRAL = dict(BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
QWEN3_MOE = dict(BASE, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                 num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])


def make_model(folder, config, dtype=torch.float32):
    torch.manual_seed(0)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), 0).eval()
    model.to(dtype).save_pretrained(folder)
    return model.float()


def to_mcore(source, target, *flags, ok=True):
    return convert("--loader", "hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
                   "--saver-transformer-impl", "local", *flags, ok=ok)


def refused_into_mcore(source, out):
    """The one error line of a conversion of `source` into mcore that must be refused, nothing written."""
    from test_bad_input import assert_no_checkpoint
    line = error_line(to_mcore(source, out, ok=False))
    assert_no_checkpoint(out)
    return line


def to_hf(source, target, *flags, ok=True):
    return convert("--loader", "mcore", "--saver", "hf", "--load-dir", source, "--save-dir", target, *flags, ok=ok)


def assert_mcore_logits(iter_dir, model):
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(iter_dir, tokens)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,config", [
    ("mixtral", transformers.MixtralConfig(**MIXTRAL)),
    ("qwen3_moe", transformers.Qwen3MoeConfig(**QWEN3_MOE)),  # layer 1 dense, top-k weights not renormalised
    ("qwen3", transformers.Qwen3Config(**dict(BASE, head_dim=32))),
])
def test_logits_in_megatron_core_and_bit_exact_back(tmp_path, name, config):
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    model = make_model(source, config)
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2)
    assert_mcore_logits(megatron / "iter_0000001", model)
    to_hf(megatron, back)
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)


def test_expert_parallel_folders_and_shards(tmp_path):
    """EP 2 x TP 2 x PP 2: Megatron-LM's folder names; each EP rank numbers its experts from 0 and each
    TP rank holds the SwiGLU split [gate_r; up_r] of them; EP 2 -> EP 1 gives the same logits."""
    source, megatron, single, back = tmp_path / "hf", tmp_path / "ep2", tmp_path / "ep1", tmp_path / "back"
    model = make_model(source, transformers.MixtralConfig(**MIXTRAL), torch.bfloat16)
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2,
             "--target-expert-parallel-size", 2)
    iteration = megatron / "iter_0000001"
    assert sorted(p.name for p in iteration.iterdir()) == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2)
                                                           for p in range(2) for e in range(2)]
    hf = read_safetensors_folder(source)
    state = torch.load(iteration / "mp_rank_01_001_001" / "model_optim_rng.pt", weights_only=False)
    assert state["args"].expert_model_parallel_size == 2 and state["args"].num_experts == 4
    fc1 = state["model"]["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"]  # layer 3, expert 2
    prefix = "model.layers.3.block_sparse_moe.experts.2."
    gate, up = hf[prefix + "w1.weight"], hf[prefix + "w3.weight"]
    assert torch.equal(fc1, torch.cat([gate[16:], up[16:]]))
    assert torch.equal(state["model"]["decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight"],
                       hf["model.layers.3.block_sparse_moe.experts.3.w2.weight"][:, 16:])
    assert not any(".local_experts.2." in key for key in state["model"])
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", megatron, "--save-dir", single,
            "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1,
            "--target-expert-parallel-size", 1, "--saver-transformer-impl", "local")
    assert [p.name for p in (single / "iter_0000001").iterdir()] == ["mp_rank_00"]
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(single / "iter_0000001", tokens)
    expected = hf_logits(model.to(torch.bfloat16).float(), tokens)
    torch.testing.assert_close(logits[..., :VOCAB], expected, atol=1e-4, rtol=0)
    to_hf(megatron, back)
    assert_bit_identical(source, back)


def test_a_checkpoint_megatron_made_gets_its_family_from_the_args(tmp_path):
    """No HF config in the args (as a checkpoint Megatron-LM trained): MoE -> mixtral, MoE with q/k norms
    -> qwen3_moe (its dense layers as mlp_only_layers), q/k norms alone -> qwen3."""
    cases = {"mixtral": transformers.MixtralConfig(**MIXTRAL), "qwen3_moe": transformers.Qwen3MoeConfig(**QWEN3_MOE),
             "qwen3": transformers.Qwen3Config(**dict(BASE, head_dim=32))}
    for family, config in cases.items():
        source, megatron, back = tmp_path / family, tmp_path / f"{family}-mcore", tmp_path / f"{family}-back"
        model = make_model(source, config)
        to_mcore(source, megatron)
        rank = megatron / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
        state = torch.load(rank, weights_only=False)
        del state["args"].hf_config_json, state["args"].hf_source_dir
        torch.save(state, rank)
        to_hf(megatron, back)
        written = read_config(back)
        assert written["model_type"] == family and written["architectures"] == config.architectures
        converted = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
        tokens = tokens_for(VOCAB)
        torch.testing.assert_close(hf_logits(converted, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)


def test_hub_spelling_of_the_expert_count_is_kept(tmp_path):
    """Qwen3-MoE configs on the Hub say num_experts; transformers 5 saves num_local_experts."""
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    make_model(source, transformers.Qwen3MoeConfig(**QWEN3_MOE))
    config = read_config(source)
    config["num_experts"] = config.pop("num_local_experts")
    (source / "config.json").write_text(json.dumps(config))
    to_mcore(source, megatron)
    to_hf(megatron, back)
    assert read_config(back) == config
    assert_bit_identical(source, back)


def test_bad_moe_input_is_one_line(tmp_path):
    source = tmp_path / "hf"
    make_model(source, transformers.MixtralConfig(**MIXTRAL))
    process = to_mcore(source, tmp_path / "ep3", "--target-expert-parallel-size", 3, ok=False)
    assert "expert parallel size 3 does not divide the 4 experts" in error_line(process)
    process = convert("--loader", "hf", "--saver", "megatron", "--load-dir", source, "--save-dir", tmp_path / "dist",
                      ok=False)
    assert "num_experts cannot be written as legacy" in error_line(process)
    megatron = tmp_path / "mcore"
    to_mcore(source, megatron)
    rank = megatron / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank, weights_only=False)
    state["args"].moe_router_score_function = "sigmoid"
    torch.save(state, rank)
    assert "moe_router_score_function 'sigmoid' (softmax only)" in error_line(to_hf(megatron, tmp_path / "o1", ok=False))
    assert "--hf-model-type gpt2: this saver writes llama, " in \
        error_line(to_hf(megatron, tmp_path / "o3", "--hf-model-type", "gpt2", ok=False))
    dense = tmp_path / "dense"
    make_model(dense, transformers.Qwen3Config(**dict(BASE, head_dim=32)))
    assert "--moe-grouped-gemm for a model without experts" in \
        error_line(to_mcore(dense, tmp_path / "o4", "--moe-grouped-gemm", ok=False))
    config = read_config(source)
    config["num_local_experts"] = 5  # the weights hold 4
    (source / "config.json").write_text(json.dumps(config))
    line = error_line(to_mcore(source, tmp_path / "o2", ok=False))
    assert "model.safetensors: model.layers.0.block_sparse_moe.gate.weight has shape [4, 64], config.json implies " \
           "[5, 64]" in line
    for out in ("ep3", "dist", "o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists()


@pytest.mark.parametrize("name,config", [
    ("mixtral", transformers.MixtralConfig(**MIXTRAL)),  # every layer MoE: layers stacked on one axis
    ("qwen3_moe", transformers.Qwen3MoeConfig(**QWEN3_MOE)),  # dense and MoE layers mix: per-layer keys
])
def test_torch_dist_experts_load_in_megatron_core_and_come_back(tmp_path, name, config):
    source, dist, back = tmp_path / "hf", tmp_path / "dist", tmp_path / "back"
    model = make_model(source, config)
    to_mcore(source, dist, "--ckpt-format", "torch_dist")
    tokens = tokens_for(VOCAB)
    logits = dist_logits(dist / "iter_0000001", tokens, tp=2)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)
    to_hf(dist, back)
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)


def test_torch_dist_experts_megatron_core_saved(tmp_path):
    """A MoE checkpoint megatron-core's dist_checkpointing wrote itself (TP 2) converts to a Mixtral
    with its logits, and to per-rank files at EP 2."""
    tokens = tokens_for(VOCAB)
    _, expected = save_dist_checkpoint(tmp_path / "dist", tokens=tokens, tp=2, num_layers=2, num_query_groups=2,
                                       num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                                       model_type=ModelType.encoder_or_decoder)
    to_hf(tmp_path / "dist", tmp_path / "hf")
    assert read_config(tmp_path / "hf")["model_type"] == "mixtral"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(model, tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "dist", "--save-dir", tmp_path / "ep2",
            "--target-expert-parallel-size", 2, "--saver-transformer-impl", "local")
    convert("--loader", "mcore", "--saver", "hf", "--load-dir", tmp_path / "ep2", "--save-dir", tmp_path / "hf2")
    assert_bit_identical(tmp_path / "hf", tmp_path / "hf2")


def test_torch_dist_of_a_moe_layer_pattern_keys_every_layer(tmp_path):
    """moe_layer_freq as a list, here all MoE ([1, 1], as Megatron-LM's --moe-layer-freq "([1]*2)"): megatron-core
    keys every layer of torch_dist on its own then, so a torch_dist we write from such a checkpoint must
    too; megatron-core loads it strictly, with the logits of the model it saved."""
    tokens = tokens_for(VOCAB)
    _, expected = save_dist_checkpoint(tmp_path / "dist", tokens=tokens, tp=2, num_layers=2, num_query_groups=2,
                                       num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_layer_freq=[1, 1],
                                       model_type=ModelType.encoder_or_decoder)
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "dist", "--save-dir", tmp_path / "again",
            "--ckpt-format", "torch_dist", "--saver-transformer-impl", "local")
    torch.testing.assert_close(dist_logits(tmp_path / "again" / "iter_0000001", tokens, tp=2), expected, atol=1e-4, rtol=0)


def test_transformer_engine_names_sequential_and_grouped(tmp_path):
    """TE names: SequentialMLP (local_experts.{j}.linear_fc1.weight) and, with --moe-grouped-gemm,
    TEGroupedMLP (linear_fc1.weight{j}, one extra state per GroupedLinear); MoE layers keep
    pre_mlp_layernorm. Both load into megatron-core (TE names mapped to its local spec) with the logits
    and go back to HF bit-exactly, also via EP 2 SequentialMLP; GroupedMLP's local names are refused."""
    source = tmp_path / "hf"
    model = make_model(source, transformers.Qwen3MoeConfig(**QWEN3_MOE))
    hf = read_safetensors_folder(source)
    gate, up = (hf[f"model.layers.0.mlp.experts.3.{p}_proj.weight"] for p in ("gate", "up"))
    for name, flags in (("sequential", []), ("grouped", ["--moe-grouped-gemm"])):
        target = tmp_path / name
        convert("--loader", "hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
                "--target-tensor-parallel-size", 2, *flags)
        state = torch.load(target / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)
        assert "decoder.layers.0.pre_mlp_layernorm.weight" in state["model"]  # MoE layer: a separate norm
        assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in state["model"]  # dense layer: fused
        fc1 = ("decoder.layers.0.mlp.experts.linear_fc1.weight3" if flags else
               "decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight")
        assert torch.equal(state["model"][fc1], torch.cat([gate[16:], up[16:]]))
        assert state["args"].moe_grouped_gemm is bool(flags)
        tokens = tokens_for(VOCAB)
        logits = mcore_logits(target / "iter_0000001", tokens, te_names=True)
        torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)
        to_hf(target, tmp_path / f"{name}-hf")
        assert_bit_identical(source, tmp_path / f"{name}-hf")
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "grouped", "--save-dir",
            tmp_path / "regrouped", "--no-moe-grouped-gemm", "--target-expert-parallel-size", 2)
    to_hf(tmp_path / "regrouped", tmp_path / "regrouped-hf")
    assert_bit_identical(source, tmp_path / "regrouped-hf")
    process = convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "grouped", "--save-dir",
                      tmp_path / "local", "--saver-transformer-impl", "local", ok=False)
    assert "moe_grouped_gemm with local names (GroupedMLP's fused weight1 / weight2) is not supported" in \
        error_line(process)
    assert not (tmp_path / "local").exists()
