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
