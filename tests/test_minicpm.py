"""MiniCPM <-> Megatron-Core both ways, and MiniCPM -> plain Llama. The truth is a MiniCPM forward written
from the published formulas (minicpm_reference), megatron-core with MiniCPM's multipliers (mcore_harness),
and transformers' LlamaForCausalLM."""

import json

import pytest
import torch
import transformers

from helpers import FIXTURES, assert_bit_identical, convert, error_line, read_config, read_safetensors_folder, tokens_for
from mcore_harness import mcore_logits
from minicpm_reference import REMOTE_CODE_FILES, make_minicpm_folder, minicpm_config, minicpm_logits

FIXTURE = FIXTURES / "minicpm4-0.5b"
TOKENIZER_FILES = ["added_tokens.json", "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]


def to_mcore(source, target, *flags):
    convert("--loader", "minicpm_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2, *flags)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_minicpm_mcore_minicpm_is_bit_exact(tmp_path, tied, kv_heads):
    make_minicpm_folder(tmp_path / "hf", minicpm_config(tied=tied, kv_heads=kv_heads), dtype=torch.bfloat16)
    to_mcore(tmp_path / "hf", tmp_path / "mcore")
    args = torch.load(next((tmp_path / "mcore").glob("iter_*/mp_rank_00_000/model_optim_rng.pt")), weights_only=False)["args"]
    assert (args.scale_emb, args.scale_depth, args.dim_model_base, args.rope_scaling_type) == (12, 1.4, 16, "longrope")
    assert args.rope_scaling_original_max_position_embeddings == 256 and len(args.long_factor) == 8
    convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "back")
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(tmp_path / "hf")


@pytest.mark.parametrize("tied,longrope", [(True, True), (False, False)])
def test_mcore_with_minicpm_multipliers_gives_minicpm_logits(tmp_path, tied, longrope):
    config = minicpm_config(tied=tied, longrope=longrope)
    state = make_minicpm_folder(tmp_path / "hf", config, dtype=torch.float32)
    to_mcore(tmp_path / "hf", tmp_path / "mcore", "--saver-transformer-impl", "local")
    tokens = tokens_for(96, 32)
    logits = mcore_logits(tmp_path / "mcore" / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :96], minicpm_logits(state, config, tokens), atol=1e-3, rtol=0)


@pytest.mark.parametrize("longrope", [True, False], ids=["longrope", "plain-rope"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_minicpm_to_llama_folds_the_scalars(tmp_path, tied, longrope):
    config = minicpm_config(tied=tied, longrope=longrope)
    state = make_minicpm_folder(tmp_path / "hf", config, dtype=torch.float32)
    process = convert("--loader", "minicpm_hf", "--saver", "llama_hf", "--load-dir", tmp_path / "hf",
                      "--save-dir", tmp_path / "llama")
    assert "folded MiniCPM's muP scalars into the weights for LlamaForCausalLM" in process.stdout
    llama_config = read_config(tmp_path / "llama")
    assert (llama_config["model_type"], llama_config["tie_word_embeddings"]) == ("llama", False)
    assert not {"scale_emb", "scale_depth", "dim_model_base", "auto_map"} & set(llama_config)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    tokens = tokens_for(96, 32)
    with torch.no_grad():
        logits = model(tokens).logits
    torch.testing.assert_close(logits, minicpm_logits(state, config, tokens), atol=1e-3, rtol=0)


def test_minicpm_to_llama_longer_than_the_original_context(tmp_path):
    """max_position_embeddings above the original: MiniCPM always uses the long factors and its own
    attention scale; the Llama config must pin the same at every length."""
    config = minicpm_config()
    config["max_position_embeddings"] = 1024
    state = make_minicpm_folder(tmp_path / "hf", config, dtype=torch.float32)
    convert("--loader", "minicpm_hf", "--saver", "llama_hf", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "llama")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    tokens = tokens_for(96, 32)
    with torch.no_grad():
        logits = model(tokens).logits
    torch.testing.assert_close(logits, minicpm_logits(state, config, tokens), atol=1e-3, rtol=0)


@pytest.mark.parametrize("max_positions", [64, 32], ids=["max-equals-original", "max-below-original"])
def test_minicpm4_to_llama_past_max_position_embeddings(tmp_path, max_positions):
    """The released MiniCPM4 layout, max_position_embeddings == LongRoPE's original length (64 here), or
    below it, through Megatron to a plain Llama. MiniCPM's remote code grows its rope cache for a longer
    input and takes the long factors past the original length; transformers' Llama must too (the short
    factors were written into both lists, 4e-2 off at 65 tokens). Wider than the other tests so rope
    visibly matters."""
    config = minicpm_config(hidden=256, intermediate=320)
    config["rope_scaling"]["original_max_position_embeddings"] = 64
    config["max_position_embeddings"] = max_positions
    state = make_minicpm_folder(tmp_path / "hf", config, dtype=torch.float32)
    to_mcore(tmp_path / "hf", tmp_path / "mcore")
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "llama")
    llama = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    for length in (64, 65, 96):  # a fresh remote model each time: its rope cache never shrinks
        remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True,
                                                                   dtype=torch.float32).eval()
        tokens = tokens_for(96, length)
        with torch.no_grad():
            expected = remote(tokens).logits
            torch.testing.assert_close(llama(tokens).logits, expected, atol=1e-4, rtol=0)
        if length == 64:  # within max positions the remote code's rope is the reference formulas'
            torch.testing.assert_close(expected, minicpm_logits(state, config, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("setting", ["sparse_config", "dynamic"])
def test_settings_without_a_llama_equivalent_are_refused(tmp_path, setting):
    config = minicpm_config(longrope=False)
    if setting == "sparse_config":
        config["sparse_config"] = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                                   "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}
    else:
        config["rope_scaling"] = {"type": "dynamic", "factor": 4.0}
    make_minicpm_folder(tmp_path / "hf", config)
    process = convert("--loader", "minicpm_hf", "--saver", "llama_hf", "--load-dir", tmp_path / "hf",
                      "--save-dir", tmp_path / "llama", ok=False)
    assert "no Llama equivalent" in error_line(process)
    assert not (tmp_path / "llama").exists()
    to_mcore(tmp_path / "hf", tmp_path / "mcore")  # both are carried through to Megatron and back untouched
    convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "back")
    assert read_config(tmp_path / "back") == config


def test_real_minicpm4_config_and_tokenizer_round_trip(tmp_path):
    real = json.loads((FIXTURE / "config.json").read_text())
    config = minicpm_config(base=real, vocab=real["vocab_size"])  # the real vocabulary, for the real tokenizer
    config["sparse_config"] = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                               "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}
    assert "tie_word_embeddings" not in config and "model_type" not in config  # as shipped: tied by default
    make_minicpm_folder(tmp_path / "hf", config)
    to_mcore(tmp_path / "hf", tmp_path / "mcore", "--tokenizer-model", FIXTURE)
    convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "back",
            "--tokenizer-model", FIXTURE)
    assert read_config(tmp_path / "back") == config
    assert "lm_head.weight" not in read_safetensors_folder(tmp_path / "back")
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")
    for name in TOKENIZER_FILES:
        assert (tmp_path / "back" / name).read_bytes() == (FIXTURE / name).read_bytes()


def test_minicpm_from_megatron_args_alone(tmp_path):
    """No HF config anywhere: the MiniCPM config.json comes from the Megatron args, scalars explicit."""
    config = minicpm_config(tied=False)
    state = make_minicpm_folder(tmp_path / "hf", config, dtype=torch.float32)
    to_mcore(tmp_path / "hf", tmp_path / "mcore")
    for path in (tmp_path / "mcore").glob("iter_*/*/model_optim_rng.pt"):
        checkpoint = torch.load(path, weights_only=False)
        del checkpoint["args"].hf_config_json
        torch.save(checkpoint, path)
    convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "back")
    written = read_config(tmp_path / "back")
    assert written["architectures"] == ["MiniCPMForCausalLM"] and written["model_type"] == "minicpm"
    assert written["auto_map"]["AutoModelForCausalLM"] == "modeling_minicpm.MiniCPMForCausalLM"
    assert (written["scale_emb"], written["scale_depth"], written["dim_model_base"]) == (12, 1.4, 16)
    assert written["rope_scaling"] == config["rope_scaling"]
    tokens = tokens_for(96, 32)
    torch.testing.assert_close(minicpm_logits(read_safetensors_folder(tmp_path / "back"), written, tokens),
                               minicpm_logits(state, config, tokens), atol=0, rtol=0)


def test_missing_scalar_is_refused(tmp_path):
    config = minicpm_config()
    del config["dim_model_base"]
    make_minicpm_folder(tmp_path / "hf", config)
    process = convert("--loader", "minicpm_hf", "--saver", "mcore", "--load-dir", tmp_path / "hf",
                      "--save-dir", tmp_path / "mcore", ok=False)
    assert "dim_model_base is missing" in error_line(process)


def test_minicpm_output_loads_with_its_remote_code(tmp_path):
    """config.json's auto_map names modeling files: the output carries them (from the source folder
    recorded in the checkpoint, else --hf-reference-dir) and transformers loads it with MiniCPM's logits;
    with neither, the saver refuses in one line naming the flag."""
    config = minicpm_config(longrope=False)
    state = make_minicpm_folder(tmp_path / "hf", config, dtype=torch.float32)
    to_mcore(tmp_path / "hf", tmp_path / "mcore")
    convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "back")
    for name in REMOTE_CODE_FILES:
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", trust_remote_code=True,
                                                              dtype=torch.float32).eval()
    tokens = tokens_for(96, 32)
    with torch.no_grad():
        logits = model(tokens).logits
    torch.testing.assert_close(logits, minicpm_logits(state, config, tokens), atol=1e-4, rtol=0)

    code = tmp_path / "code"  # the original model's non-weight files, kept elsewhere
    code.mkdir()
    (code / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    for name in REMOTE_CODE_FILES:
        (tmp_path / "hf" / name).rename(code / name)
    process = convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "mcore",
                      "--save-dir", tmp_path / "refused", ok=False)
    assert "modeling_minicpm.py" in error_line(process) and "--hf-reference-dir" in error_line(process)
    assert not (tmp_path / "refused").exists()
    convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "ref",
            "--hf-reference-dir", code)
    assert sorted(p.name for p in (tmp_path / "ref").glob("*.py")) == sorted(REMOTE_CODE_FILES)


def test_minicpm_moe_logits_in_megatron_core_and_bit_exact_back(tmp_path):
    """MiniCPM-MoE (model_type minicpm with num_experts; vLLM's names mlp.gate, mlp.experts.E.w1/w3/w2):
    megatron-core with the muP multipliers gives the reference forward's logits (softmax top-2 of 4,
    renormalised); TP 2 x EP 2 back to MiniCPM is bit-exact, remote code included."""
    config = dict(minicpm_config(), num_experts=4, num_experts_per_tok=2, intermediate_size=32, torch_dtype="float32")
    state = make_minicpm_folder(tmp_path / "hf", config, dtype=torch.float32)
    convert("--loader", "minicpm_hf", "--saver", "mcore", "--load-dir", tmp_path / "hf", "--save-dir",
            tmp_path / "mcore", "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local")
    args = torch.load(tmp_path / "mcore" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size, args.scale_emb) == (4, 2, 32, 12)
    tokens = tokens_for(96, 32)
    logits = mcore_logits(tmp_path / "mcore" / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :96], minicpm_logits(state, config, tokens), atol=1e-3, rtol=0)
    convert("--loader", "minicpm_hf", "--saver", "mcore", "--load-dir", tmp_path / "hf", "--save-dir",
            tmp_path / "ep2", "--target-tensor-parallel-size", 2, "--target-expert-parallel-size", 2)
    convert("--loader", "mcore", "--saver", "minicpm_hf", "--load-dir", tmp_path / "ep2", "--save-dir", tmp_path / "back")
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(tmp_path / "hf")
    assert all((tmp_path / "back" / name).is_file() for name in REMOTE_CODE_FILES)
