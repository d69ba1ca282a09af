"""Hugging Face families as data: a Family names its architectures, its layer table (table.py: rows
of HF tensors, message keys and the kind of mapping between them) and its features (features.py,
moe.py, mtp.py, mla.py; norm, activation, experts, multi-token prediction, multi-latent attention, a
plugin's own). The generic HF loader and saver (hf_stream) run
any Family; built-in and third-party families are written the same way, and nothing here names one."""

from converter_core.hf_family.config import (DTYPE_NAMES, DTYPES, args_from_config, check_counts, config_from_args,
                                             retargeted)
from converter_core.hf_family.family import (Family, by_model_type, check_table, expected_shapes, family_for_stream,
                                             family_of, float32_names, layer_to_message, message_to_layer, mismatch,
                                             stored_config)
from converter_core.hf_family.features import (HF_ACTIVATIONS, LLAMA_BIAS_SWITCHES, Activation, Feature, Fold, Norm,
                                               Refused, megatron_activation)
from converter_core.hf_family.mla import Mla
from converter_core.hf_family.moe import Experts
from converter_core.hf_family.mtp import MTP_PARTS, Mtp, check_copies as check_mtp_copies, stored_layers as stored_mtp_layers
from converter_core.hf_family.rope import rope_settings
from converter_core.hf_family.table import (COPY, DENSE_LAYER, EXPERTS, FUSED_GATE_UP, FUSED_QKV, LLAMA_ATTENTION,
                                            LLAMA_LAYER, LLAMA_MLP, MLA_ATTENTION, MLA_KV_DOWN, MLA_Q, MOE_LAYER, QK_NORM,
                                            QKV, QKV_BIAS, Kind, Tensor, experts, on_dense_layers, shared_experts)

__all__ = ["DTYPE_NAMES", "DTYPES", "args_from_config", "check_counts", "config_from_args", "retargeted", "Family",
           "by_model_type", "check_table", "expected_shapes", "family_for_stream", "family_of", "float32_names",
           "layer_to_message", "message_to_layer", "mismatch", "stored_config", "HF_ACTIVATIONS", "LLAMA_BIAS_SWITCHES",
           "Activation", "Feature", "Fold", "Norm", "Refused", "megatron_activation", "Experts", "rope_settings", "COPY",
           "DENSE_LAYER", "EXPERTS", "FUSED_GATE_UP", "FUSED_QKV", "LLAMA_ATTENTION", "LLAMA_LAYER", "LLAMA_MLP",
           "MLA_ATTENTION", "MLA_KV_DOWN", "MLA_Q", "MOE_LAYER", "QK_NORM", "QKV", "QKV_BIAS", "Kind", "Tensor",
           "experts", "on_dense_layers", "shared_experts",
           "MTP_PARTS", "Mtp", "check_mtp_copies", "stored_mtp_layers", "Mla"]
