"""Checkpoints whose args are what Megatron-LM writes today (the fixture Namespace: hundreds of fields,
`layernorm_epsilon`, `exit_signal` a signal.Signals, `attention_backend` an AttnBackend) convert to HF
with megatron-core's logits, per-rank and torch_dist; converting them Megatron -> Megatron keeps every
field, under the classes Megatron-LM itself loads, and the result still converts and runs."""

import argparse
import pickle
import re
import signal
import zipfile

import pytest
import torch
import transformers
from megatron.core.transformer.enums import AttnBackend

from dist_harness import read_common, save_dist_checkpoint
from helpers import FIXTURES, convert, hf_logits, read_config, tokens_for
from mcore_harness import _read_rank_file, mcore_logits, megatron_lm_args, save_mcore_checkpoint

FIXTURE = FIXTURES / "megatron-lm-args"

VOCAB = 96
MODEL = dict(num_layers=4, num_query_groups=2)


def transformers_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return hf_logits(model, tokens)


def to_hf(source, target):
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", source, "--save-dir", target)


class _Anything:
    """Stands in for every class a pickle names, keeping the state it is given."""
    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _RawUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _Anything


def fields_in_the_file(path):
    """The attribute names of the pickled Namespace, read from the file's bytes without torch or any class."""
    with zipfile.ZipFile(path) as archive:
        [data] = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        namespace = _RawUnpickler(archive.open(data)).load()
    return sorted(namespace.state)


def test_fixture_is_what_megatron_lm_writes():
    args = megatron_lm_args()
    stored = fields_in_the_file(FIXTURE / "pretrain_gpt_args.pt")
    assert sorted(vars(args)) == stored  # read as Megatron-LM reads it, no field lost
    said = re.search(r"(\d+) attributes", (FIXTURE / "README.md").read_text())
    assert said and len(stored) == int(said.group(1))  # the fixture's README describes this file
    assert isinstance(args.exit_signal, signal.Signals) and isinstance(args.attention_backend, AttnBackend)
    assert hasattr(args, "layernorm_epsilon") and not hasattr(args, "norm_epsilon")


@pytest.mark.parametrize("te_names", [False, True], ids=["local", "te"])
@pytest.mark.parametrize("tp", [1, 2])
def test_per_rank_checkpoint_to_hf(tmp_path, tp, te_names):
    tokens = tokens_for(VOCAB)
    _, expected = save_mcore_checkpoint(tmp_path / "mcore", tokens=tokens, tp=tp, te_names=te_names,
                                        base=megatron_lm_args(), **MODEL)
    to_hf(tmp_path / "mcore", tmp_path / "hf")
    config = read_config(tmp_path / "hf")
    assert (config["rms_norm_eps"], config["num_hidden_layers"], config["vocab_size"]) == (1e-5, 4, VOCAB)
    torch.testing.assert_close(transformers_logits(tmp_path / "hf", tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)


def test_torch_dist_checkpoint_to_hf(tmp_path):
    tokens = tokens_for(VOCAB)
    _, expected = save_dist_checkpoint(tmp_path / "dist", tokens=tokens, tp=2, base=megatron_lm_args(), **MODEL)
    to_hf(tmp_path / "dist", tmp_path / "hf")
    torch.testing.assert_close(transformers_logits(tmp_path / "hf", tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)


def assert_megatron_lm_fields_kept(written, source):
    """Every field of the source args survives, with Megatron-LM's classes and today's names."""
    assert isinstance(written, argparse.Namespace)
    assert written.exit_signal is signal.SIGTERM and written.attention_backend is AttnBackend.auto
    assert written.layernorm_epsilon == source.layernorm_epsilon
    same = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "world_size", "transformer_impl",
            "ckpt_format", "use_dist_ckpt", "iteration", "params_dtype", "bf16", "fp16", "padded_vocab_size",
            "vocab_size", "data_parallel_size"}
    for name, value in vars(source).items():
        if name not in same:
            assert getattr(written, name) == value, name


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_megatron_to_megatron_keeps_args_readable(tmp_path, ckpt_format):
    tokens = tokens_for(VOCAB)
    iteration_dir, expected = save_mcore_checkpoint(tmp_path / "mcore", tokens=tokens, tp=2, te_names=True,
                                                    base=megatron_lm_args(), **MODEL)
    source = _read_rank_file(f"{iteration_dir}/mp_rank_00/model_optim_rng.pt")["args"]
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "out",
            "--target-tensor-parallel-size", 1, "--saver-transformer-impl", "local", "--ckpt-format", ckpt_format)
    written_dir = tmp_path / "out" / "iter_0000001"
    if ckpt_format == "torch":
        written = _read_rank_file(written_dir / "mp_rank_00" / "model_optim_rng.pt")["args"]
        torch.testing.assert_close(mcore_logits(written_dir, tokens)[..., :VOCAB], expected[..., :VOCAB], atol=1e-4, rtol=0)
    else:
        written = read_common(written_dir)["args"]
    assert_megatron_lm_fields_kept(written, source)
    to_hf(tmp_path / "out", tmp_path / "hf")
    torch.testing.assert_close(transformers_logits(tmp_path / "hf", tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)
