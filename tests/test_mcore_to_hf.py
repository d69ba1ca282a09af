"""Megatron-Core (per-rank torch files) -> Hugging Face: checkpoints written by megatron-core itself,
with no HF folder anywhere, load in transformers with megatron-core's logits; bad checkpoints fail cleanly."""

import io
import json
import os
import shutil

import pytest
import torch
import transformers
from megatron.core.enums import ModelType
from megatron.core.transformer.enums import AttnBackend

from helpers import (convert, error_line, hf_logits, make_hf_model, read_config, read_safetensors_folder, tokens_for,
                     write_tokenizer)
from mcore_harness import save_mcore_checkpoint

VOCAB = 96
MEGATRON_LM_ENUMS = dict(model_type=ModelType.encoder_or_decoder, attention_backend=AttnBackend.auto)


def to_hf(source, target, *flags, ok=True):
    return convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", source, "--save-dir", target, *flags, ok=ok)


def transformers_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf_logits(model, tokens)


@pytest.mark.parametrize("te_names", [False, True], ids=["local", "te"])
@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_checkpoint_to_transformers(tmp_path, tp, te_names):
    tokens = tokens_for(VOCAB)
    _, expected = save_mcore_checkpoint(tmp_path / "mcore", tokens=tokens, tp=tp, te_names=te_names,
                                        num_layers=4, num_query_groups=2, **MEGATRON_LM_ENUMS)
    to_hf(tmp_path / "mcore", tmp_path / "hf")
    config = read_config(tmp_path / "hf")
    assert (config["architectures"], config["vocab_size"], config["num_key_value_heads"]) == (["LlamaForCausalLM"], 96, 2)
    torch.testing.assert_close(transformers_logits(tmp_path / "hf", tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["tied", "qwen2"])
def test_megatron_core_tied_and_qkv_bias(tmp_path, variant):
    tokens = tokens_for(VOCAB)
    fields = {"tied": dict(untie_embeddings_and_output_weights=False),
              "qwen2": dict(add_qkv_bias=True, num_query_groups=2)}[variant]
    _, expected = save_mcore_checkpoint(tmp_path / "mcore", tokens=tokens, tp=2, te_names=True, **fields)
    to_hf(tmp_path / "mcore", tmp_path / "hf", "--max-shard-size", "20KB")
    config = read_config(tmp_path / "hf")
    assert config["architectures"] == [{"tied": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[variant]]
    assert config["tie_word_embeddings"] == (variant == "tied")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(index["weight_map"]) == sorted(read_safetensors_folder(tmp_path / "hf"))
    torch.testing.assert_close(transformers_logits(tmp_path / "hf", tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)


def test_true_vocab_size_order(tmp_path):
    tokens = tokens_for(VOCAB)
    iteration_dir, _ = save_mcore_checkpoint(tmp_path / "mcore", tokens=tokens)
    rank_file = f"{iteration_dir}/mp_rank_00/model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    state["args"].vocab_size = None  # Megatron-LM records no vocab_size when a tokenizer supplied it
    torch.save(state, rank_file)
    process = to_hf(tmp_path / "mcore", tmp_path / "padded")
    assert "keeping all 128 padded rows" in process.stdout
    assert read_config(tmp_path / "padded")["vocab_size"] == 128
    to_hf(tmp_path / "mcore", tmp_path / "flag", "--true-vocab-size", 90)
    assert read_safetensors_folder(tmp_path / "flag")["model.embed_tokens.weight"].shape[0] == 90
    write_tokenizer(tmp_path / "tok", 93)
    to_hf(tmp_path / "mcore", tmp_path / "tokenizer", "--tokenizer-model", tmp_path / "tok")
    assert read_config(tmp_path / "tokenizer")["vocab_size"] == 93
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == (tmp_path / "tok" / "tokenizer.json").read_bytes()


def test_reference_dir_config_and_files(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, "mistral")
    (source / "README.md").write_text("model card")
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", tmp_path / "mcore")
    # Strip the HF config the loader stored, so only --hf-reference-dir can bring its fields back.
    rank_file = tmp_path / "mcore" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    del state["args"].hf_config_json
    torch.save(state, rank_file)
    to_hf(tmp_path / "mcore", tmp_path / "plain")
    assert read_config(tmp_path / "plain")["model_type"] == "llama"
    to_hf(tmp_path / "mcore", tmp_path / "back", "--hf-reference-dir", source)
    assert read_config(tmp_path / "back") == read_config(source)
    assert (tmp_path / "back" / "README.md").read_text() == "model card"


def test_virtual_pipeline_checkpoint(tmp_path):
    """PP 2 x VP 2 files (model0/model1), made by hand from a TP1 PP1 checkpoint, give the same HF tensors."""
    source = tmp_path / "hf"
    make_hf_model(source)  # 4 layers
    flat = tmp_path / "flat"
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", flat)
    state = torch.load(flat / "iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=False)
    model = state["model"]
    virtual = tmp_path / "virtual"
    for pp in range(2):
        chunks = {}
        for vp in range(2):
            layer = vp * 2 + pp  # Megatron's order: chunk-major, then pipeline stage
            chunk = {k.replace(f"decoder.layers.{layer}.", "decoder.layers.0."): v for k, v in model.items()
                     if k.startswith(f"decoder.layers.{layer}.")}
            if pp == 0 and vp == 0:
                chunk["embedding.word_embeddings.weight"] = model["embedding.word_embeddings.weight"]
            if pp == 1 and vp == 1:
                chunk.update({k: v for k, v in model.items() if k.startswith(("decoder.final_layernorm", "output_layer"))})
            chunks[f"model{vp}"] = chunk
        args = state["args"]
        args.pipeline_model_parallel_size, args.virtual_pipeline_model_parallel_size = 2, 2
        folder = virtual / "iter_0000001" / f"mp_rank_00_{pp:03d}"
        folder.mkdir(parents=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 1, **chunks}, folder / "model_optim_rng.pt")
    (virtual / "latest_checkpointed_iteration.txt").write_text("1")
    to_hf(virtual, tmp_path / "back")
    expected, got = read_safetensors_folder(source), read_safetensors_folder(tmp_path / "back")
    assert sorted(expected) == sorted(got) and all(torch.equal(expected[k], got[k]) for k in expected)


def test_release_tracker_and_old_te_extra_state(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source)
    megatron = tmp_path / "mcore"
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron)
    os.rename(megatron / "iter_0000001", megatron / "release")
    (megatron / "latest_checkpointed_iteration.txt").write_text("release")
    rank_file = megatron / "release" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    for key in [k for k in state["model"] if k.endswith("_extra_state") and "layers" in k]:
        state["model"][key] = io.BytesIO(b"TE 1.x fp8 metadata")  # what TransformerEngine 1.x saved
    torch.save(state, rank_file)
    to_hf(megatron, tmp_path / "back")
    expected, got = read_safetensors_folder(source), read_safetensors_folder(tmp_path / "back")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def converted_mcore(tmp_path, tp=1):
    source, megatron = tmp_path / "hf", tmp_path / "mcore"
    make_hf_model(source)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
            "--target-tensor-parallel-size", tp)
    return megatron


def test_pickle_that_runs_code_is_refused(tmp_path):
    megatron = converted_mcore(tmp_path)
    rank_file = megatron / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    marker = tmp_path / "pwned"
    state["args"].payload = RunsCode(marker)
    torch.save(state, rank_file)
    process = to_hf(megatron, tmp_path / "out", ok=False)
    line = error_line(process)
    assert str(rank_file) in line and "refusing to unpickle posix.system" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_rank_file(tmp_path):
    megatron = converted_mcore(tmp_path, tp=2)
    shutil.rmtree(megatron / "iter_0000001" / "mp_rank_01")
    line = error_line(to_hf(megatron, tmp_path / "out", ok=False))
    assert "mp_rank_01/model_optim_rng.pt: missing rank file" in line
    assert not (tmp_path / "out").exists()


def test_shapes_that_do_not_fit_the_args(tmp_path):
    megatron = converted_mcore(tmp_path, tp=2)
    for rank in ("mp_rank_00", "mp_rank_01"):
        rank_file = megatron / "iter_0000001" / rank / "model_optim_rng.pt"
        state = torch.load(rank_file, weights_only=False)
        state["args"].ffn_hidden_size = 128  # the weights were made with 160
        torch.save(state, rank_file)
    line = error_line(to_hf(megatron, tmp_path / "out", ok=False))
    assert "mp_rank_00/model_optim_rng.pt" in line and "mlp.linear_fc1.weight" in line and "[128, 64]" in line
    assert not (tmp_path / "out").exists()


def test_parameters_we_do_not_carry_are_refused(tmp_path):
    megatron = converted_mcore(tmp_path)
    rank_file = megatron / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    state["model"]["mtp.layers.0.enorm.weight"] = torch.ones(64)  # an MTP parameter the args do not count
    torch.save(state, rank_file)
    line = error_line(to_hf(megatron, tmp_path / "out", ok=False))
    assert "mtp.layers.0.enorm.weight, a parameter this converter does not carry" in line
    state["args"].mtp_num_layers = 1
    torch.save(state, rank_file)
    assert "llama has no multi-token-prediction layers (the model has mtp_num_layers=1)" in \
        error_line(to_hf(megatron, tmp_path / "out", ok=False))
    del state["model"]["mtp.layers.0.enorm.weight"]  # q/k norms are carried, so the args must match the weights
    state["model"]["decoder.layers.0.self_attention.q_layernorm.weight"] = torch.ones(16)
    state["args"].mtp_num_layers, state["args"].qk_layernorm = None, True
    torch.save(state, rank_file)
    # into a saver that holds q/k norms, so the loader's check is the one that speaks (llama_hf refuses the
    # stream's q/k norms as soon as it sees the args)
    line = error_line(convert("--loader", "mcore", "--saver", "mcore", "--load-dir", megatron, "--save-dir",
                              tmp_path / "out", ok=False))
    assert "missing tensor decoder.layers.0.self_attention.k_layernorm.weight" in line
    assert not (tmp_path / "out").exists()


def test_settings_hf_cannot_express_are_refused(tmp_path):
    megatron = converted_mcore(tmp_path)
    rank_file = megatron / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(rank_file, weights_only=False)
    state["args"].rotary_percent = 0.5
    torch.save(state, rank_file)
    assert "rotary_percent 0.5 has no Hugging Face Llama equivalent" in error_line(to_hf(megatron, tmp_path / "out", ok=False))
