"""gpt-oss (GptOssForCausalLM) through the generic `hf` plugins: attention sinks, biases everywhere,
stacked experts with gate and up interleaved, the clamped quick-GELU GLU with offset, sliding windows on
alternate layers and YaRN rope. megatron-core's GPTModel with the converted weights gives transformers'
logits (TP 2: experts whole on every rank; MXFP4 at TP 2 x EP 2 with TransformerEngine names, run as
written); HF -> mcore -> HF is bit-exact."""

import json
import shutil

import pytest
import torch
import transformers
from megatron.core.parallel_state import RankGenerator
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from dist_harness import dist_logits
from helpers import (BASE, assert_bit_identical, edited_copy, error_line, hf_logits, read_config, read_safetensors_folder,
                     tokens_for)
from mcore_harness import mcore_logits
from test_moe import assert_mcore_logits, make_model, refused_into_mcore, to_hf, to_mcore

# sliding_window 3 so that the 8-token check sees the window; yarn with truncate=false as released
GPT_OSS = dict(BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=3,
               rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})


def as_loaded(folder):
    """The float32 model transformers makes of an HF folder: the truth for logits. Not the bf16 model that
    wrote it, cast back: casting rounded its rotary inv_freq buffer to bf16 too, which moves the logits by
    up to 1e-4 over 24 positions (loaded, transformers and megatron-core agree to about 5e-7)."""
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def bf16_tp2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    source, megatron, back = folder / "hf", folder / "mcore", folder / "back"
    make_model(source, transformers.GptOssConfig(**GPT_OSS), torch.bfloat16)
    model = as_loaded(source)
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2)
    to_hf(megatron, back)
    return source, megatron, back, model


def test_bf16_round_trip_is_bit_exact(bf16_tp2):
    source, _, back, _ = bf16_tp2
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)


def test_experts_whole_on_every_tp_rank(bf16_tp2):
    """Gate and up de-interleaved into Megatron's [W; V] fc1, down transposed into fc2; both TP ranks hold
    every expert whole (expert_tensor_parallel_size 1); sinks split with the heads."""
    source, megatron, _, _ = bf16_tp2
    hf = read_safetensors_folder(source)
    prefix = "model.layers.1."
    gate_up, down = hf[prefix + "mlp.experts.gate_up_proj"][2], hf[prefix + "mlp.experts.down_proj"][2]
    bias = hf[prefix + "mlp.experts.gate_up_proj_bias"][2]
    for rank in range(2):
        state = torch.load(megatron / "iter_0000001" / f"mp_rank_0{rank}" / "model_optim_rng.pt", weights_only=False)
        assert state["args"].expert_tensor_parallel_size == 1 and state["args"].softmax_type == "learnable"
        model = state["model"]
        experts = "decoder.layers.1.mlp.experts.local_experts.2."
        assert torch.equal(model[experts + "linear_fc1.weight"], torch.cat([gate_up[:, 0::2].T, gate_up[:, 1::2].T]))
        assert torch.equal(model[experts + "linear_fc1.bias"], torch.cat([bias[0::2], bias[1::2]]))
        assert torch.equal(model[experts + "linear_fc2.weight"], down.T)
        assert torch.equal(model["decoder.layers.1.self_attention.core_attention.softmax_offset"],
                           hf[prefix + "self_attn.sinks"][2 * rank:2 * rank + 2])


def test_logits_in_megatron_core(bf16_tp2):
    _, megatron, _, model = bf16_tp2
    assert_mcore_logits(megatron / "iter_0000001", model)


def test_torch_dist_logits(bf16_tp2, tmp_path):
    """torch_dist at TP 2: megatron-core's dist_checkpointing loads the sinks and the expert biases (under
    mlp.experts.experts.*) strictly and gives transformers' logits."""
    source, _, _, model = bf16_tp2
    to_mcore(source, tmp_path / "dist", "--target-tensor-parallel-size", 2, "--ckpt-format", "torch_dist")
    tokens = tokens_for(BASE["vocab_size"])
    logits = dist_logits(tmp_path / "dist" / "iter_0000001", tokens, tp=2)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_without_mla_for_llama_too(tmp_path, truncate):
    """The YaRN gpt-oss brought to non-MLA families (position_embedding_type yarn; truncate false: the
    unrounded correction range) is transformers' for a Llama as well."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "truncate": truncate}
    model = make_model(tmp_path / "hf", transformers.LlamaConfig(**dict(BASE, rope_parameters=rope)))
    to_mcore(tmp_path / "hf", tmp_path / "mcore")
    assert_mcore_logits(tmp_path / "mcore" / "iter_0000001", model)
    to_hf(tmp_path / "mcore", tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(tmp_path / "hf")


# The quantization_config gpt-oss releases carry (the attention, router, embeddings and head stay bf16).
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def write_mxfp4_release(folder, dequantized):
    """An MXFP4 gpt-oss folder as released: the experts' projections as random e2m1 `_blocks` (two values a
    byte, 32 a block) with exponent `_scales`; every other tensor bf16. `dequantized` gets the bf16 model
    transformers makes of it (its convert_moe_packed_tensors), the truth for the way back; that folder as
    loaded is returned, the truth for logits."""
    model = make_model(dequantized, transformers.GptOssConfig(**GPT_OSS), torch.bfloat16)
    state = {name: tensor.to(torch.bfloat16).contiguous() for name, tensor in model.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    released = {}
    for name, tensor in state.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            released[name] = tensor
            continue
        experts, rows, columns = tensor.shape[0], tensor.shape[2], tensor.shape[1]  # stored [E, out, in / 32, 16]
        blocks = torch.randint(0, 256, (experts, rows, columns // 32, 16), generator=generator, dtype=torch.uint8)
        scales = torch.randint(117, 122, (experts, rows, columns // 32), generator=generator, dtype=torch.uint8)
        released.update({name + "_blocks": blocks, name + "_scales": scales})
        state[name] = convert_moe_packed_tensors(blocks, scales)
    folder.mkdir()
    save_file(released, folder / "model.safetensors", metadata={"format": "pt"})
    config = read_config(dequantized)
    (folder / "config.json").write_text(json.dumps(dict(config, quantization_config=MXFP4_CONFIG), indent=2))
    save_file(state, dequantized / "model.safetensors", metadata={"format": "pt"})
    return as_loaded(dequantized)


def test_mxfp4_at_expert_parallel_2_with_te_names(tmp_path):
    """MXFP4 as released -> mcore TP 2 x EP 2 with TransformerEngine names and grouped experts (as Megatron-LM's
    gpt-oss recipe trains: --transformer-impl transformer_engine --moe-grouped-gemm) -> HF: the bf16 model
    transformers dequantizes, bit for bit, config.json as released without quantization_config. megatron-core
    runs the checkpoint as written, at TP 2 x EP 2 with expert TP 1 (TE names mapped to its local spec), and
    gives that model's logits. We write every TP x EP file; Megatron-LM writes only mp_rank_00_000 and
    mp_rank_01_001 (megatron_lm_rank_folders): cut down to those, the checkpoint comes back the same bits
    and megatron-core runs it."""
    source, dequantized = tmp_path / "mxfp4", tmp_path / "dequantized"
    megatron, back = tmp_path / "ep2", tmp_path / "back"
    model = write_mxfp4_release(source, dequantized)
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2, "--target-expert-parallel-size", 2,
             "--saver-transformer-impl", "transformer_engine", "--moe-grouped-gemm")
    iteration = megatron / "iter_0000001"
    folders = [f"mp_rank_{t:02d}_{e:03d}" for t in range(2) for e in range(2)]
    assert sorted(p.name for p in iteration.iterdir()) == folders
    to_hf(megatron, back)
    assert_bit_identical(dequantized, back)
    released = read_config(source)
    released.pop("quantization_config")
    assert read_config(back) == released
    written = megatron_lm_rank_folders(2, 2)
    assert len(written) == 2
    for folder in set(folders) - set(written):
        shutil.rmtree(iteration / folder)
    to_hf(megatron, tmp_path / "back_from_two")
    assert_bit_identical(back, tmp_path / "back_from_two")
    tokens = tokens_for(BASE["vocab_size"])
    logits = mcore_logits(iteration, tokens, te_names=True, ep=2)
    torch.testing.assert_close(logits[..., :BASE["vocab_size"]], hf_logits(model, tokens), atol=1e-4, rtol=0)


def megatron_lm_rank_folders(tp, ep):
    """The folders Megatron-LM writes at TP x EP with expert TP 1 (world TP x EP, PP 1): each rank of
    data-parallel rank 0 or of expert-data-parallel rank 0 saves (megatron/training/checkpointing.py since
    core_v0.18; before, the latter only), under its TP and EP rank, as megatron-core's rank generators
    number them (order tp-cp-ep-dp-pp)."""
    def rank_in(groups):
        return {rank: index for group in groups for index, rank in enumerate(group)}
    dense = RankGenerator(tp=tp, ep=1, dp=ep, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=1, ep=ep, dp=tp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    t, e = rank_in(dense.get_ranks("tp")), rank_in(expert.get_ranks("ep"))
    dp, expert_dp = rank_in(dense.get_ranks("dp")), rank_in(expert.get_ranks("dp"))
    return sorted({f"mp_rank_{t[r]:02d}_{e[r]:03d}" for r in range(tp * ep) if dp[r] == 0 or expert_dp[r] == 0})


def test_only_the_rank_files_megatron_lm_writes_at_tp_2_ep_4(bf16_tp2, tmp_path):
    """TP 2 x EP 4 with experts whole cut down to the four files Megatron-LM writes comes back bit-exact (dense
    shards from mp_rank_00_000 and mp_rank_01_001, experts from all four); one of them missing is one line
    naming it, and nothing is written."""
    source, megatron, back, refused = bf16_tp2[0], tmp_path / "mcore", tmp_path / "back", tmp_path / "refused"
    to_mcore(source, megatron, "--target-tensor-parallel-size", 2, "--target-expert-parallel-size", 4)
    iteration = megatron / "iter_0000001"
    written = megatron_lm_rank_folders(2, 4)
    assert len(written) == 4 and len(list(iteration.iterdir())) == 8
    for folder in sorted(iteration.iterdir()):
        if folder.name not in written:
            shutil.rmtree(folder)
    to_hf(megatron, back)
    assert_bit_identical(source, back)
    shutil.rmtree(iteration / written[-1])
    line = error_line(to_hf(megatron, refused, ok=False))
    assert f"{iteration / written[-1] / 'model_optim_rng.pt'}: missing rank file" in line
    assert not (refused / "config.json").exists() and not list(refused.glob("*.safetensors"))


def test_sinks_of_the_wrong_size_are_refused(bf16_tp2, tmp_path):
    name = "model.layers.1.self_attn.sinks"
    source = edited_copy(bf16_tp2[0], tmp_path / "hf", tensors=lambda state: state.update({name: state[name][:3]}))
    line = refused_into_mcore(source, tmp_path / "out")
    assert name in line and "[3]" in line and f"[{GPT_OSS['num_attention_heads']}]" in line


def test_layer_types_of_another_length_are_refused(bf16_tp2, tmp_path):
    source = edited_copy(bf16_tp2[0], tmp_path / "hf", config=lambda config: dict(
        config, layer_types=config["layer_types"][:-1]))
    line = refused_into_mcore(source, tmp_path / "out")
    assert "config.json" in line and "layer_types" in line and f"{GPT_OSS['num_hidden_layers']} layers" in line


def test_mxfp4_blocks_without_scales_are_refused(tmp_path):
    release = tmp_path / "mxfp4"
    write_mxfp4_release(release, tmp_path / "dequantized")
    name = "model.layers.2.mlp.experts.down_proj"
    source = edited_copy(release, tmp_path / "hf", tensors=lambda state: state.pop(name + "_scales"))
    line = refused_into_mcore(source, tmp_path / "out")
    assert "model.safetensors" in line and f"{name}_blocks without its scales" in line
