"""The plugin SDK: the one converter_core module a loader or saver plugin imports. Everything named
here is stable (kept with the same meaning across minor versions); see docs/plugins.md.

A plugin module has Megatron's interface, `add_arguments(parser)` and `load_checkpoint(queue, args)` or
`save_checkpoint(queue, args)`, and may declare MODEL_TYPES, FAMILIES, MEGATRON_FORMATS, FORMAT_FLAGS
and NOTES. An HF family is data (Family + a table of Tensor rows); load_hf / save_hf run any family.
"""

import torch

from converter_core import hf_stream, layout
from converter_core.errors import ConversionError, require
from converter_core.formats.hf import HFWeights, PlannedSafetensors, read_json
from converter_core.formats.torch_file import load as load_torch_file
from converter_core.hf_family import (COPY, DENSE_LAYER, EXPERTS, FUSED_GATE_UP, FUSED_QKV, LLAMA_ATTENTION,
                                      LLAMA_BIAS_SWITCHES, LLAMA_LAYER, LLAMA_MLP, MLA_ATTENTION, MLA_KV_DOWN, MLA_Q,
                                      MOE_LAYER, QK_NORM, QKV, QKV_BIAS, Activation, Experts, Family, Feature, Fold, Kind,
                                      Mla, Norm, Refused, Tensor, by_model_type, experts, on_dense_layers, retargeted,
                                      rope_settings, shared_experts, stored_config)
from converter_core.hf_family.family import deprecate_switch
from converter_core.hf_family.mtp import MTP_PARTS, Mtp
from converter_core.hf_family.rope import config_value as rope_config_value
from converter_core.megatron import load as megatron_load, load_flags, save as megatron_save
from converter_core.megatron.args import complete as complete_args, linear_attention_layers, make_args, plain_copy
from converter_core.megatron.keys import (COLUMN, LINEAR_ATTENTION, MOE as MOE_LAYERS, REPLICATED, ROW, SWIGLU,
                                          Condition, LayerKey, register_dimension, register_layer_key)
from converter_core.megatron.schema import FORMATS, CoreSchema, LegacySchema
from converter_core.output import StagedFolder, commit_gate, write_atomically
from converter_core.share import write_pieces
from converter_core.protocol import (DONE, EMBEDDINGS, EXIT, FINAL_NORM, LAYER_KEYS, OUTPUT_LAYER, Receiver,
                                     exit_on_failure, layer_message_shapes, layer_name, make_metadata, report, send,
                                     saver_takes_rows, send_model, stall_timeout)
from converter_core.protocol import mtp_layer_name, reads_mtp_layers, takes_rows

__all__ = [
    # families as data
    "Family", "Tensor", "COPY", "QKV", "FUSED_QKV", "FUSED_GATE_UP", "EXPERTS", "MOE_LAYER", "DENSE_LAYER",
    "LLAMA_ATTENTION", "LLAMA_MLP", "LLAMA_LAYER", "QKV_BIAS", "QK_NORM", "Experts", "experts", "on_dense_layers",
    "shared_experts", "Kind", "tensor_of",
    "by_model_type",
    # multi-latent attention
    "Mla", "MLA_ATTENTION", "MLA_Q", "MLA_KV_DOWN",
    # multi-token prediction
    "Mtp", "MTP_PARTS", "mtp_layer_name", "reads_mtp_layers", "takes_rows",
    # family features
    "Feature", "Norm", "Activation", "Refused", "LLAMA_BIAS_SWITCHES", "Fold", "stored_config", "retargeted",
    "rope_settings", "rope_config_value",
    "deprecate_switch",
    # ready-made HF and Megatron loaders and savers
    "add_hf_loader_arguments", "load_hf", "add_hf_saver_arguments", "save_hf",
    "add_megatron_loader_arguments", "load_megatron", "add_megatron_saver_arguments", "save_megatron", "FORMATS",
    # a saver split over ranks (converter_core.share): its plugin's finish_share(args, pieces) calls one of these
    "finish_hf_share", "finish_megatron_share", "write_pieces",
    # message keys a plugin adds
    "LayerKey", "Condition", "MOE_LAYERS", "LINEAR_ATTENTION", "linear_attention_layers", "COLUMN", "ROW",
    "REPLICATED", "SWIGLU", "register_layer_key", "register_dimension",
    # the queue protocol
    "EMBEDDINGS", "FINAL_NORM", "OUTPUT_LAYER", "DONE", "EXIT", "LAYER_KEYS", "layer_name", "layer_message_shapes",
    "make_metadata", "make_args", "complete_args", "plain_copy", "send", "send_model", "Receiver", "exit_on_failure", "report",
    "stall_timeout", "saver_takes_rows",
    # safe readers and staged writers
    "HFWeights", "read_json", "load_torch_file", "PlannedSafetensors", "StagedFolder", "commit_gate", "write_atomically",
    # errors
    "ConversionError", "require",
]


def _one_op_thread():
    """Loading and saving only copy and slice tensors, which one thread does at memory speed; torch's
    other OpenMP threads would spin between those copies on the CPUs the writer threads need (on 2
    CPUs: 0.2-0.3 s of CPU in a 2.5 s conversion from HF to TP2 x PP2). Runs in the loader's or saver's
    process."""
    torch.set_num_threads(1)


def tensor_of(value):
    """A plain tensor from a message value: a saver may receive a Megatron source's TP shards as row or
    column blocks (not yet concatenated); a Kind's to_hf that computes on a tensor calls this first."""
    return layout.tensor_of(value)


def add_hf_loader_arguments(parser, title, model_sizes=None):
    """convert.py's HF loader flags (--true-vocab-size, --tokenizer-model, --bf16, ...); `model_sizes`: the
    --model-size choices of the convert.py plugin this loader replaces."""
    hf_stream.add_loader_arguments(parser, title, model_sizes)


def load_hf(queue, args, families):
    """The HF loader for `families` ({model_type: Family}); puts "exit" on the queue if it fails."""
    _one_op_thread()
    with exit_on_failure(queue):
        hf_stream.load(queue, args, families)


def add_hf_saver_arguments(parser, title):
    """The HF saver flags (--hf-reference-dir, --tokenizer-model, --max-shard-size, ...)."""
    hf_stream.add_saver_arguments(parser, title)


def save_hf(queue, args, families, folds=()):
    """The HF saver: writes the stream's family if it is one of `families`, else the first that holds
    the stream's tensors, as a staged folder that appears complete or not at all. `folds`: features
    (beyond those of `families`) whose settings a stream may carry and that can fold them into the
    weights of a family without them."""
    _one_op_thread()
    hf_stream.save(queue, args, families, folds)


def add_megatron_loader_arguments(parser, title, default_impl="transformer_engine"):
    """convert.py's Megatron loader flags (--true-vocab-size, --position-embedding-type, --loader-transformer-impl, ...)."""
    load_flags.add_loader_arguments(parser, title, default_impl)


def load_megatron(queue, args):
    """Reads any Megatron-Core (per-rank torch or torch_dist) or legacy GPT checkpoint."""
    _one_op_thread()
    with exit_on_failure(queue):
        megatron_load.load(queue, args)


def add_megatron_saver_arguments(parser, title, default_impl="transformer_engine"):
    """convert.py's Megatron saver flags (--target-tensor-parallel-size, --target-pipeline-parallel-size, --saver-transformer-impl, ...)."""
    megatron_save.add_saver_arguments(parser, title, default_impl)


def finish_hf_share(args, pieces):
    """save_hf's finish for a job split over ranks: rank 0, once every rank wrote its shards (`pieces`: each
    rank's, indexed by rank), writes the index, config.json and the side files and commits. A saver
    plugin built on save_hf defines `finish_share(args, pieces)` as a call of this."""
    hf_stream.finish_share(args, pieces)


def finish_megatron_share(args, pieces):
    """save_megatron's finish for a job split over ranks, as finish_hf_share: torch_dist's .metadata, the
    commit, the tracker last."""
    megatron_save.finish_share(args, pieces)


def save_megatron(queue, args, fmt):
    """Writes `fmt` (one of FORMATS): "torch" / "torch_dist" with args.saver_transformer_impl's names, or
    "legacy" (local names only)."""
    _one_op_thread()
    require(fmt in FORMATS, f"unknown Megatron format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt == "legacy":
        require(args.saver_transformer_impl == "local",
                "the legacy saver writes local (non-TransformerEngine) names only; drop --saver-transformer-impl")
        megatron_save.save(queue, args, LegacySchema())
    else:
        megatron_save.save(queue, args, CoreSchema(args.saver_transformer_impl), fmt)
