"""HF -> Megatron-Core: the converted checkpoint loads strictly into megatron-core's GPTModel (one process
per TP rank over gloo) and gives the transformers model's logits."""

import pytest
import torch
import transformers

from helpers import BASE, convert, hf_logits, make_hf_model, tokens_for
from mcore_harness import mcore_logits

VOCAB = BASE["vocab_size"]


def convert_and_compare(tmp_path, variant, tp, pp, impl, length=24, **overrides):
    source, target = tmp_path / "hf", tmp_path / "mcore"
    model = make_hf_model(source, variant, **overrides)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
            "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp,
            "--saver-transformer-impl", impl)
    tokens = tokens_for(VOCAB, length)
    logits = mcore_logits(target / "iter_0000001", tokens, te_names=impl == "transformer_engine")
    expected = hf_logits(model, tokens)
    assert logits.shape[-1] == 128 * tp  # 96 padded to a multiple of make_vocab_size_divisible_by (128) x TP
    torch.testing.assert_close(logits[..., :VOCAB], expected, atol=1e-4, rtol=0)
    return model, tokens, expected


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_llama_at_every_layout(tmp_path, tp, pp, impl):
    convert_and_compare(tmp_path, "llama", tp, pp, impl)


@pytest.mark.parametrize("variant,tp,pp", [("qwen2", 2, 2), ("mistral", 2, 2), ("tied", 2, 2), ("tied", 1, 2),
                                           ("mqa", 1, 2), ("mha", 2, 2)])
def test_families_and_attention_shapes(tmp_path, variant, tp, pp):
    convert_and_compare(tmp_path, variant, tp, pp, "transformer_engine")


def test_llama31_rope_scaling(tmp_path):
    model, tokens, expected = convert_and_compare(tmp_path, "llama31", 2, 2, "local", length=96)
    # The scaling must matter at this length, or the comparison above proves nothing about it.
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**model.config.to_dict(), "rope_scaling": None,
                                                                      "rope_parameters": None})).eval()
    plain.load_state_dict(model.state_dict())
    assert (hf_logits(plain, tokens) - expected).abs().max() > 1e-3
