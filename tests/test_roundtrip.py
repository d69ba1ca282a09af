"""HF -> Megatron-Core (TP 2, PP 2, TE names) -> HF is bit-exact, and resharding is bit-exact."""

import shutil

import pytest
import torch

from helpers import assert_bit_identical, convert, make_hf_model, read_config, read_safetensors_folder


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen2", "tied"])
def test_hf_mcore_hf_is_bit_exact(tmp_path, variant, dtype):
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    make_hf_model(source, variant, dtype=dtype)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron, "--save-dir", back)
    assert_bit_identical(source, back)
    assert read_config(back) == read_config(source)
    assert ("lm_head.weight" in read_safetensors_folder(back)) == (variant != "tied")


@pytest.mark.parametrize("layout", ["bin", "sharded-safetensors"])
def test_pytorch_bin_and_sharded_sources(tmp_path, layout):
    source, megatron, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "back"
    model = make_hf_model(tmp_path / "plain", "qwen2")
    if layout == "bin":
        source.mkdir()  # transformers 5 writes only safetensors; a .bin is torch.save of the state dict
        torch.save(model.state_dict(), source / "pytorch_model.bin")
        shutil.copy(tmp_path / "plain" / "config.json", source / "config.json")
    else:
        model.save_pretrained(source, max_shard_size="30KB")
        assert (source / "model.safetensors.index.json").exists()
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", 2)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron, "--save-dir", back)
    assert_bit_identical(tmp_path / "plain", back)


def test_reshard_tp1pp1_to_tp2pp2_and_back_is_bit_exact(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, "qwen2")
    start, wide, narrow = tmp_path / "tp1", tmp_path / "tp2pp2", tmp_path / "again"
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", start,
            "--saver-transformer-impl", "local")
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", start, "--save-dir", wide,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", wide, "--save-dir", narrow,
            "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1,
            "--saver-transformer-impl", "local")
    first = torch.load(start / "iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)
    last = torch.load(narrow / "iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert list(first["model"]) == list(last["model"])
    for key, value in first["model"].items():
        if torch.is_tensor(value):
            assert value.dtype == last["model"][key].dtype and torch.equal(value, last["model"][key]), key
        else:
            assert last["model"][key] is None and value is None, key
    assert vars(first["args"]) == vars(last["args"])


# What Megatron-LM's load_args_from_checkpoint reads (megatron/training/checkpointing.py) for a dense GPT.
MEGATRON_LM_RESUME_ARGS = [
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads", "kv_channels",
    "max_position_embeddings", "num_query_groups", "group_query_attention", "position_embedding_type",
    "add_position_embedding", "use_rotary_position_embeddings", "rotary_base", "rotary_percent", "rotary_interleaved",
    "add_bias_linear", "add_qkv_bias", "squared_relu", "swiglu", "untie_embeddings_and_output_weights",
    "apply_layernorm_1p", "normalization", "apply_query_key_layer_scaling", "attention_dropout", "hidden_dropout",
    "num_experts", "tokenizer_model", "tokenizer_type", "padded_vocab_size", "ckpt_format",
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size", "norm_epsilon", "params_dtype", "bf16", "fp16", "iteration"]


def test_rank_files_need_nothing_but_torch_and_argparse(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, "llama31", dtype=torch.bfloat16)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "mcore",
            "--target-pipeline-parallel-size", 2)
    for path in sorted((tmp_path / "mcore").glob("iter_0000001/mp_rank_*/model_optim_rng.pt")):
        # argparse.Namespace may already be allow-listed (megatron-core registers it when imported)
        assert set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) <= {"argparse.Namespace"}
        with torch.serialization.safe_globals([__import__("argparse").Namespace]):
            state = torch.load(path, weights_only=True)
        assert sorted(state) == ["args", "checkpoint_version", "iteration", "model", "num_floating_point_operations_so_far"]
        assert (state["checkpoint_version"], state["iteration"]) == (3.0, 1)
        args = state["args"]
        assert not [name for name in MEGATRON_LM_RESUME_ARGS if not hasattr(args, name)]
        assert (args.num_layers, args.hidden_size, args.num_query_groups, args.group_query_attention) == (4, 64, 2, True)
        assert (args.rotary_base, args.use_rope_scaling, args.rope_scaling_factor, args.norm_epsilon) == (10000.0, True, 8.0, 1e-5)
        assert (args.params_dtype, args.bf16, args.padded_vocab_size, args.vocab_size) == (torch.bfloat16, True, 128, 96)
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 2)
