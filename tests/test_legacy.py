"""Legacy Megatron-LM GPT checkpoints (nested `language_model` state dicts): HF -> legacy loads in
megatron-core after a renaming written here, hand-written legacy files in both spellings convert to
HF and to Megatron-Core, and legacy <-> Megatron-Core is bit-exact."""

import argparse
import re

import pytest
import torch

from helpers import (BASE, assert_bit_identical, convert, hf_logits, make_hf_model, read_safetensors_folder,
                     tokens_for)
from mcore_harness import mcore_logits

VOCAB = BASE["vocab_size"]

# Legacy name -> Megatron-Core local-spec name, written from Megatron-LM's two model definitions.
LEGACY_TO_CORE = [
    (r"^language_model\.embedding\.word_embeddings\.weight$", "embedding.word_embeddings.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.input_norm\.weight$", r"decoder.layers.\1.input_layernorm.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)$",
     r"decoder.layers.\1.self_attention.linear_qkv.\2"),
    (r"^language_model\.encoder\.layers\.(\d+)\.self_attention\.dense\.weight$",
     r"decoder.layers.\1.self_attention.linear_proj.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.post_attention_norm\.weight$", r"decoder.layers.\1.pre_mlp_layernorm.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight$", r"decoder.layers.\1.mlp.linear_fc1.weight"),
    (r"^language_model\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight$", r"decoder.layers.\1.mlp.linear_fc2.weight"),
    (r"^language_model\.encoder\.final_norm\.weight$", "decoder.final_layernorm.weight"),
    (r"^language_model\.output_layer\.weight$", "output_layer.weight"),
    (r"^word_embeddings_for_head\.weight$", "output_layer.weight"),
]


def flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def legacy_to_core_checkpoint(legacy, core):
    """Rewrite every legacy rank file as the Megatron-Core local-spec file megatron-core expects."""
    for path in sorted(legacy.glob("iter_*/mp_rank_*/model_optim_rng.pt")):
        state = torch.load(path, weights_only=False)
        model = {}
        for name, value in flatten(state["model"]).items():
            renamed = [re.sub(pattern, target, name) for pattern, target in LEGACY_TO_CORE if re.match(pattern, name)]
            assert len(renamed) == 1, f"no rule for {name}"
            model[renamed[0]] = value
        layers = {int(m.group(1)) for k in model if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
        for i in layers:
            for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
                model[f"decoder.layers.{i}.{module}._extra_state"] = None
        if "decoder.final_layernorm.weight" in model:
            model["output_layer._extra_state"] = None
        state["model"] = model
        state["args"].transformer_impl = "local"
        target = core / path.relative_to(legacy)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, target)
    (core / "latest_checkpointed_iteration.txt").write_text((legacy / "latest_checkpointed_iteration.txt").read_text())


@pytest.mark.parametrize("variant,tp,pp", [("llama", 1, 1), ("llama", 1, 2), ("llama", 2, 1), ("llama", 2, 2),
                                           ("tied", 2, 2)])
def test_hf_to_legacy_loads_in_megatron_core(tmp_path, variant, tp, pp):
    source, legacy, core = tmp_path / "hf", tmp_path / "legacy", tmp_path / "core"
    model = make_hf_model(source, variant)
    convert("--loader", "llama_hf", "--saver", "megatron", "--load-dir", source, "--save-dir", legacy,
            "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp)
    state = torch.load(next(legacy.glob("iter_*/mp_rank_00*/model_optim_rng.pt")), weights_only=False)
    assert "language_model" in state["model"] and state["args"].use_legacy_models is True
    legacy_to_core_checkpoint(legacy, core)
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(core / "iter_0000001", tokens)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)


def hand_written_legacy(folder, hf_state, config, old_spelling, version=3.0):
    """A TP 1 / PP 1 legacy checkpoint written here from HF weights, as Megatron-LM's legacy GPT saved it."""
    heads, groups = config["num_attention_heads"], config["num_key_value_heads"]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = hidden // heads
    norm_in, norm_post, norm_final, attention, encoder = (
        ("input_layernorm", "post_attention_layernorm", "final_layernorm", "attention", "transformer") if old_spelling
        else ("input_norm", "post_attention_norm", "final_norm", "self_attention", "encoder"))
    layer_tensors = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        q = hf_state[p + "self_attn.q_proj.weight"].reshape(groups, heads // groups * head_dim, hidden)
        k = hf_state[p + "self_attn.k_proj.weight"].reshape(groups, head_dim, hidden)
        v = hf_state[p + "self_attn.v_proj.weight"].reshape(groups, head_dim, hidden)
        qkv = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        if version < 2.0:  # MHA only: version 0 stored [3, heads, d], version 1 [heads, d, 3]
            per_head = qkv.view(heads, 3, head_dim, hidden)
            qkv = (per_head.transpose(0, 1) if version == 0 else per_head.permute(0, 2, 1, 3)).reshape(-1, hidden).contiguous()
        layer_tensors.update({
            f"layers.{i}.{norm_in}.weight": hf_state[p + "input_layernorm.weight"],
            f"layers.{i}.{attention}.query_key_value.weight": qkv,
            f"layers.{i}.{attention}.dense.weight": hf_state[p + "self_attn.o_proj.weight"],
            f"layers.{i}.{norm_post}.weight": hf_state[p + "post_attention_layernorm.weight"],
            f"layers.{i}.mlp.dense_h_to_4h.weight": torch.cat([hf_state[p + "mlp.gate_proj.weight"],
                                                               hf_state[p + "mlp.up_proj.weight"]]),
            f"layers.{i}.mlp.dense_4h_to_h.weight": hf_state[p + "mlp.down_proj.weight"],
        })
    layer_tensors[f"{norm_final}.weight"] = hf_state["model.norm.weight"]
    padded = 128
    embedding = torch.cat([hf_state["model.embed_tokens.weight"],
                           torch.zeros(padded - config["vocab_size"], hidden)])
    language_model = {"embedding": {"word_embeddings": {"weight": embedding}}, encoder: layer_tensors}
    if "lm_head.weight" in hf_state:
        language_model["output_layer"] = {"weight": torch.cat([hf_state["lm_head.weight"],
                                                               torch.zeros(padded - config["vocab_size"], hidden)])}
    args = argparse.Namespace(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=config["intermediate_size"], num_attention_heads=heads,
        group_query_attention=groups != heads, num_query_groups=groups, kv_channels=head_dim,
        max_position_embeddings=config["max_position_embeddings"], seq_length=128, position_embedding_type="rope",
        rotary_base=int(config.get("rope_theta", 10000)), rotary_percent=1.0, normalization="RMSNorm",
        norm_epsilon=config["rms_norm_eps"], swiglu=True, add_bias_linear=False, add_qkv_bias=False,
        untie_embeddings_and_output_weights="lm_head.weight" in hf_state, padded_vocab_size=padded,
        vocab_size=config["vocab_size"], make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, params_dtype=torch.float32, fp16=False, bf16=False,
        use_legacy_models=True, transformer_impl="local", iteration=5, tokenizer_type="HuggingFaceTokenizer")
    rank = folder / "iter_0000005" / "mp_rank_00"
    rank.mkdir(parents=True)
    torch.save({"args": args, "checkpoint_version": version, "iteration": 5,
                "model": {"language_model": language_model}}, rank / "model_optim_rng.pt")
    (folder / "latest_checkpointed_iteration.txt").write_text("5")


@pytest.mark.parametrize("old_spelling", [False, True], ids=["norm", "layernorm"])
def test_hand_written_legacy_to_hf_and_mcore(tmp_path, old_spelling):
    source = tmp_path / "hf"
    model = make_hf_model(source)
    hf_state = read_safetensors_folder(source)
    hand_written_legacy(tmp_path / "legacy", hf_state, model.config.to_dict(), old_spelling)
    convert("--loader", "legacy", "--saver", "llama_hf", "--load-dir", tmp_path / "legacy", "--save-dir", tmp_path / "back")
    assert_bit_identical(source, tmp_path / "back")
    convert("--loader", "megatron", "--saver", "mcore", "--load-dir", tmp_path / "legacy", "--save-dir", tmp_path / "core",
            "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local")
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(tmp_path / "core" / "iter_0000005", tokens)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("version", [0, 1])
def test_checkpoint_versions_before_2_are_reordered(tmp_path, version):
    source = tmp_path / "hf"
    model = make_hf_model(source, "mha")
    hand_written_legacy(tmp_path / "legacy", read_safetensors_folder(source), model.config.to_dict(), False, version)
    convert("--loader", "megatron", "--saver", "llama_hf", "--load-dir", tmp_path / "legacy", "--save-dir", tmp_path / "back")
    assert_bit_identical(source, tmp_path / "back")


def test_legacy_mcore_legacy_is_bit_exact(tmp_path):
    source = tmp_path / "hf"
    make_hf_model(source, "qwen2")
    legacy, core, again = tmp_path / "legacy", tmp_path / "core", tmp_path / "again"
    convert("--loader", "llama_hf", "--saver", "megatron", "--load-dir", source, "--save-dir", legacy,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    convert("--loader", "megatron", "--saver", "mcore", "--load-dir", legacy, "--save-dir", core,
            "--target-tensor-parallel-size", 1, "--target-pipeline-parallel-size", 1)
    convert("--loader", "mcore", "--saver", "megatron", "--load-dir", core, "--save-dir", again,
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    for path in sorted(legacy.glob("iter_*/*/model_optim_rng.pt")):
        first = flatten(torch.load(path, weights_only=False)["model"])
        second = flatten(torch.load(again / path.relative_to(legacy), weights_only=False)["model"])
        assert list(first) == list(second)
        assert all(torch.equal(first[k], second[k]) and first[k].dtype == second[k].dtype for k in first)
