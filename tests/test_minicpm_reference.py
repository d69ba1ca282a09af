"""Self-test of the MiniCPM reference: the plain-torch forward must agree with transformers' Llama over
folded weights and with megatron-core (through mcore_harness's multipliers) over a hand-made
checkpoint, and every muP scalar and the LongRoPE choice must visibly matter."""

import argparse
import json

import pytest
import torch
from safetensors import safe_open

import mcore_harness as harness
from helpers import FIXTURES
import minicpm_reference as ref

FIXTURE = FIXTURES / "minicpm4-0.5b" / "config.json"
TOKENS = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(3))
ROPES = {
    "plain": None,
    "longrope-short": 256,  # max positions == original: short factors, multiplier 1 (every shipped config)
    "longrope-long": 512,  # max > original: long factors, multiplier sqrt(1 + ln 2 / ln 256)
    "longrope-below": 128,  # max < original: short factors, multiplier below 1 (remote code, unclamped)
}


def make(tmp_path, rope="longrope-short", tied=True, kv_heads=2, dtype=torch.float32, seed=0):
    config = ref.minicpm_config(tied=tied, kv_heads=kv_heads, longrope=ROPES[rope] is not None)
    if ROPES[rope] is not None:
        config["max_position_embeddings"] = ROPES[rope]
    return config, ref.make_minicpm_folder(tmp_path / "hf", config, seed=seed, dtype=dtype)


def llama_logits(state, config, tokens=TOKENS):
    with torch.no_grad():
        return ref.llama_with_folded_scalars(state, config)(tokens).logits.float()


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_forward_equals_llama_with_folded_scalars(tmp_path, rope, tied, kv_heads):
    config, state = make(tmp_path, rope, tied, kv_heads)
    logits = ref.minicpm_logits(state, config, TOKENS)
    assert logits.shape == (2, 32, 96) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, llama_logits(state, config), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "edit, at_least",
    [({"scale_emb": 1}, 1e-2), ({"scale_depth": 1}, 1e-2), ({"dim_model_base": 64}, 1e-2),
     ({"rope_scaling": None}, 1e-3), ({"max_position_embeddings": 512}, 1e-3),
     ({"max_position_embeddings": 128}, 1e-3)],
    ids=["scale_emb", "scale_depth", "dim_model_base", "longrope-off", "long-instead-of-short",
         "multiplier-below-1"],
)
def test_every_scalar_and_the_rope_choice_matter(tmp_path, edit, at_least):
    """Rope moves these logits less than the scalars do, but still far above the 1e-4 compared at."""
    config, state = make(tmp_path, tied=False)
    changed = {**config, **edit}
    expected = ref.minicpm_logits(state, changed, TOKENS)
    assert (expected - ref.minicpm_logits(state, config, TOKENS)).abs().max() > at_least
    # The Llama cross-check follows the edit, so the agreement above is not a coincidence.
    torch.testing.assert_close(llama_logits(state, changed), expected, atol=1e-4, rtol=0)


def test_tied_lm_head_follows_the_config(tmp_path):
    config, state = make(tmp_path, tied=True)
    assert "lm_head.weight" not in state
    extra = {**state, "lm_head.weight": torch.randn(96, 64)}
    torch.testing.assert_close(ref.minicpm_logits(extra, config, TOKENS), ref.minicpm_logits(state, config, TOKENS))
    untied = {**config, "tie_word_embeddings": False}
    assert (ref.minicpm_logits(extra, untied, TOKENS) - ref.minicpm_logits(state, config, TOKENS)).abs().max() > 1e-2


def test_folder_is_a_minicpm_checkpoint(tmp_path):
    config = ref.minicpm_config(tied=False)
    state = ref.make_minicpm_folder(tmp_path, config, seed=4)
    assert json.loads((tmp_path / "config.json").read_text()) == config
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == sorted(state)
        assert all(torch.equal(handle.get_tensor(name), state[name]) for name in state)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert len(state) == 2 + 9 * 4 + 1 and state["lm_head.weight"].shape == (96, 64)
    assert state["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # 2 KV heads of 16
    assert abs(state["model.norm.weight"].float().mean() - 1) < 0.2
    scaling = config["rope_scaling"]
    assert len(scaling["short_factor"]) == len(scaling["long_factor"]) == 8
    assert scaling["short_factor"] != scaling["long_factor"] and max(scaling["short_factor"]) > 7
    assert config["hidden_size"] / config["dim_model_base"] == 4
    tied_with_head = ref.make_minicpm_folder(tmp_path / "t", ref.minicpm_config(), with_lm_head=True)
    assert torch.equal(tied_with_head["lm_head.weight"], tied_with_head["model.embed_tokens.weight"])


def test_config_from_the_real_fixture_keeps_its_fields(tmp_path):
    real = json.loads(FIXTURE.read_text())
    real["sparse_config"] = {"kernel_size": 32, "dense_len": 8192}
    config = ref.minicpm_config(base=real)
    assert set(config) == set(real) and "tie_word_embeddings" not in config and "model_type" not in config
    assert config["sparse_config"] == real["sparse_config"] and config["eos_token_id"] == [2, 73440]
    assert (config["hidden_size"], config["vocab_size"], config["dim_model_base"]) == (64, 96, 16)
    factors = config["rope_scaling"]["short_factor"]
    assert len(factors) == 8 and factors[0] == real["rope_scaling"]["short_factor"][0]
    assert factors[-1] == real["rope_scaling"]["short_factor"][-1]
    assert real["hidden_size"] == 1024  # the base itself is untouched
    state = ref.make_minicpm_folder(tmp_path, config, dtype=torch.float32)
    assert "lm_head.weight" not in state  # tie_word_embeddings absent: the remote default, tied
    torch.testing.assert_close(ref.minicpm_logits(state, config, TOKENS), llama_logits(state, config),
                               atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# megatron-core, through mcore_harness, over a checkpoint written by hand
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rope, tied, kv_heads, tp",
    [("longrope-short", True, 2, 1), ("longrope-long", False, 2, 1), ("longrope-below", False, 4, 1),
     ("plain", True, 4, 1), ("longrope-long", True, 2, 2)],
    ids=["short-tied-gqa", "long-untied-gqa", "below-untied-mha", "plain-tied-mha", "long-tied-gqa-tp2"],
)
def test_megatron_core_gives_the_reference_logits(tmp_path, rope, tied, kv_heads, tp):
    config, state = make(tmp_path, rope, tied, kv_heads)
    iter_dir = ref.save_minicpm_mcore_checkpoint(tmp_path / "mcore", state, config, tp=tp,
                                                 make_vocab_size_divisible_by=128 // tp)
    args = read(harness.rank_file(iter_dir, tp - 1, 0, 1))["args"]
    assert (args.scale_emb, args.scale_depth, args.dim_model_base) == (12, 1.4, 16)
    assert getattr(args, "rope_scaling_type", None) == (None if rope == "plain" else "longrope")
    logits = harness.mcore_logits(iter_dir, TOKENS)
    assert logits.shape == (2, 32, 128)
    torch.testing.assert_close(logits[..., :96], ref.minicpm_logits(state, config, TOKENS), atol=1e-4, rtol=0)


def test_megatron_core_without_the_multipliers_is_plain_llama(tmp_path):
    """Removing MiniCPM's args runs the same weights as a plain Llama: the harness really applies them."""
    config, state = make(tmp_path, "longrope-long", tied=False)
    iter_dir = ref.save_minicpm_mcore_checkpoint(tmp_path / "mcore", state, config)
    path = harness.rank_file(iter_dir, 0, 0, 1)
    checkpoint = read(path)
    for name in harness.MINICPM_ARGS:
        delattr(checkpoint["args"], name)
    torch.save(checkpoint, path)
    logits = harness.mcore_logits(iter_dir, TOKENS)[..., :96]
    llama = {**config, "rope_scaling": None, "scale_emb": 1, "scale_depth": 2.0, "dim_model_base": 64}  # 2 = sqrt(4)
    torch.testing.assert_close(logits, ref.minicpm_logits(state, llama, TOKENS), atol=1e-4, rtol=0)
    assert (logits - ref.minicpm_logits(state, config, TOKENS)).abs().max() > 1e-2


def read(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)
