"""The model description every part of the converter shares: a Megatron-LM style argparse.Namespace.

Megatron's savers read model shape from `md.checkpoint_args`, and Megatron-LM resumes training from the
`args` pickled in a checkpoint, so the same plain Namespace (only builtins and torch dtypes inside) is
both our internal model description and what we write to disk.
"""

import argparse
import functools
import json
import math

import torch

from converter_core.errors import require
from converter_core.formats.untrusted import WEIGHT_DTYPES, is_count

# Megatron-LM argparse defaults for the attributes its checkpoint loading and model building read.
_MEGATRON_DEFAULTS = dict(
    seq_length=4096,
    position_embedding_type="rope",
    add_position_embedding=True,  # Megatron-LM's default, also for rope runs (its resume check compares it)
    use_rotary_position_embeddings=True,
    rotary_percent=1.0,
    rotary_interleaved=False,
    rotary_seq_len_interpolation_factor=None,
    use_rope_scaling=False,
    rope_scaling_factor=8.0,
    normalization="RMSNorm",
    apply_layernorm_1p=False,
    swiglu=True,
    squared_relu=False,
    add_bias_linear=False,
    add_qkv_bias=False,
    qk_layernorm=False,
    group_query_attention=False,
    num_query_groups=1,
    kv_channels=None,
    untie_embeddings_and_output_weights=False,
    make_vocab_size_divisible_by=128,
    vocab_size=None,
    tokenizer_type=None,
    tokenizer_model=None,
    vocab_file=None,
    merge_file=None,
    num_experts=None,
    moe_router_topk=2,
    moe_ffn_hidden_size=None,
    moe_layer_freq=1,
    moe_router_score_function="softmax",
    moe_router_pre_softmax=False,
    moe_router_enable_expert_bias=False,
    moe_router_num_groups=None,
    moe_router_group_topk=None,
    moe_router_topk_scaling_factor=None,
    moe_shared_expert_intermediate_size=None,
    moe_grouped_gemm=False,
    multi_latent_attention=False,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_head_dim=128,
    qk_pos_emb_head_dim=64,
    v_head_dim=128,
    rope_type=None,
    rotary_scaling_factor=1.0,
    mscale=1.0,
    mscale_all_dim=0.0,
    yarn_original_max_position_embeddings=None,
    yarn_beta_fast=None,
    yarn_beta_slow=None,
    moe_aux_loss_coeff=0.0,
    moe_router_load_balancing_type="aux_loss",
    moe_token_dispatcher_type="allgather",
    expert_tensor_parallel_size=None,
    mtp_num_layers=None,
    spec=None,
    tiktoken_pattern=None,
    use_tokenizer_model_from_checkpoint_args=True,
    encoder_num_layers=None,
    decoder_num_layers=None,
    apply_query_key_layer_scaling=False,
    attention_softmax_in_fp32=False,
    sequence_parallel=False,
    tensor_model_parallel_size=1,
    pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None,
    num_layers_per_virtual_pipeline_stage=None,
    expert_model_parallel_size=1,
    context_parallel_size=1,
    data_parallel_size=1,
    world_size=1,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    init_method_std=0.02,
    use_legacy_models=False,
    use_mcore_models=True,
    transformer_impl="transformer_engine",
    ckpt_format="torch",
    iteration=1,
    consumed_train_samples=0,
    consumed_valid_samples=0,
    train_iters=None,
    micro_batch_size=1,
    global_batch_size=None,
    fp16=False,
    bf16=False,
    save=None,
    load=None,
)


def make_args(*, num_layers, hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups,
              kv_channels, max_position_embeddings, norm_epsilon, rotary_base, vocab_size,
              params_dtype, where="checkpoint args", **fields):
    """A complete Megatron-LM args Namespace for a dense rotary GPT; `fields` override defaults; `where`
    (the file the values come from) names it in a refusal."""
    args = argparse.Namespace(**_MEGATRON_DEFAULTS)
    args.num_layers = num_layers
    args.hidden_size = hidden_size
    args.ffn_hidden_size = ffn_hidden_size
    args.num_attention_heads = num_attention_heads
    args.group_query_attention = num_query_groups != num_attention_heads
    args.num_query_groups = num_query_groups
    args.kv_channels = kv_channels
    args.max_position_embeddings = max_position_embeddings
    args.seq_length = min(_MEGATRON_DEFAULTS["seq_length"], max_position_embeddings)
    args.encoder_seq_length = args.seq_length
    args.layernorm_epsilon = args.norm_epsilon = norm_epsilon
    args.rotary_base = rotary_base
    args.vocab_size = vocab_size
    args.padded_vocab_size = vocab_size
    for name, value in fields.items():
        setattr(args, name, value)
    set_dtype(args, params_dtype)
    return complete(args, where)


# Fields Megatron-LM renamed, (today's name, older name, default), from its argument history: the
# `--norm-epsilon` and `--apply-layernorm-1p` flags kept their spelling while their destinations became
# TransformerConfig's names in January 2026 (before September 2023 the epsilon was layernorm_epsilon
# too). A value is read under whichever name a checkpoint has and written under both, so Megatron-LM
# main, older Megatron-LM and either's convert.py plugins each find it where they look.
RENAMED = (
    ("layernorm_epsilon", "norm_epsilon", 1e-5),
    ("layernorm_zero_centered_gamma", "apply_layernorm_1p", False),
)
# Older flags read in the opposite sense (only read: today's Megatron-LM ignores them).
INVERTED = (("add_bias_linear", "disable_bias_linear"), ("use_legacy_models", "use_mcore_models"))
# Without these there is no model to convert; everything else has a default or is derived.
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads")
# Sizes that, when given, must be positive integers before anything is sized from them.
COUNTS = ("ffn_hidden_size", "num_query_groups", "kv_channels", "seq_length", "max_position_embeddings",
          "vocab_size", "padded_vocab_size", "make_vocab_size_divisible_by", "tensor_model_parallel_size",
          "pipeline_model_parallel_size", "expert_model_parallel_size", "num_experts", "moe_router_topk",
          "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_num_groups",
          "moe_router_group_topk", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
          "mtp_num_layers", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
          "linear_num_key_heads", "linear_num_value_heads")

# Switches and names the converter branches on: when given, a bool and a string (a truthy "False" or a
# number in their place would silently choose a layout).
SWITCHES = ("swiglu", "squared_relu", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "group_query_attention",
            "untie_embeddings_and_output_weights", "multi_latent_attention", "use_legacy_models", "use_mcore_models",
            "apply_layernorm_1p", "layernorm_zero_centered_gamma", "rotary_interleaved", "bf16", "fp16",
            "moe_grouped_gemm", "moe_router_pre_softmax", "moe_router_enable_expert_bias",
            "use_rotary_position_embeddings", "add_position_embedding", "disable_bias_linear")
NAMES = ("normalization", "position_embedding_type", "transformer_impl", "moe_router_score_function", "rope_type")
# Numbers the converter copies into configs or scales weights by: finite reals when given.
REALS = ("norm_epsilon", "layernorm_epsilon", "rotary_base", "rotary_percent", "rope_scaling_factor",
         "rotary_scaling_factor", "moe_router_topk_scaling_factor")


# Counts that size per-layer and per-expert tables before any file is compared with them: far above
# any model's, far below what would exhaust memory (num_experts 2**31 did).
LIMITS = {"num_layers": 2**16, "num_experts": 2**16, "moe_router_topk": 2**16, "mtp_num_layers": 2**8}


def _check_types(present, where):
    for name in REQUIRED + COUNTS:
        value = present.get(name)
        require(value is None or is_count(value), f"{where}: {name} is {value!r:.40}, not a positive integer")
        require(value is None or value <= LIMITS.get(name, value), f"{where}: {name} is {value}, more than "
                                                                   f"the {LIMITS.get(name)} this converter allows")
    for name in SWITCHES:
        value = present.get(name)
        require(value is None or isinstance(value, bool), f"{where}: {name} is {value!r:.40}, not True or False")
    for name in NAMES:
        value = present.get(name)
        require(value is None or isinstance(value, str), f"{where}: {name} is {value!r:.40}, not a name")
    for name in REALS:
        value = present.get(name)
        require(value is None or type(value) in (int, float) and math.isfinite(value),
                f"{where}: {name} is {value!r:.40}, not a finite number")
    text = present.get("hf_config_json")  # the source's config.json, kept for the HF savers
    if text is not None:
        try:
            config = json.loads(text) if isinstance(text, str) else None
        except (ValueError, RecursionError):
            config = None
        require(isinstance(config, dict), f"{where}: hf_config_json is {text!r:.40}, not a JSON object")
    dtype = present.get("params_dtype")
    require(dtype is None or dtype in WEIGHT_DTYPES,
            f"{where}: params_dtype is {dtype!r:.40}, not a floating-point dtype")


def complete(args, where="checkpoint args"):
    """Make any Megatron-LM args Namespace (any version, ours or a foreign plugin's) complete for the
    converter, in place: renamed fields under both names, missing fields derived or defaulted."""
    missing = [name for name in REQUIRED if getattr(args, name, None) is None]
    require(not missing, f"{where}: no {', '.join(missing)} in the Megatron args")
    present = vars(args)
    _check_types(present, where)
    for today, older, default in RENAMED:
        value = present[today] if present.get(today) is not None else present.get(older)
        setattr(args, today, default if value is None else value)
        setattr(args, older, default if value is None else value)
    for today, older in INVERTED:
        if present.get(today) is None and present.get(older) is not None:
            setattr(args, today, not present[older])
    if present.get("position_embedding_type") is None:
        args.position_embedding_type = "rope" if present.get("use_rotary_position_embeddings") else "learned_absolute"
    for name, value in _MEGATRON_DEFAULTS.items():
        if present.get(name) is None:
            setattr(args, name, value)
    if present.get("max_position_embeddings") is None:
        args.max_position_embeddings = args.seq_length
    if present.get("rotary_base") is None:
        args.rotary_base = 10000
    if present.get("params_dtype") is None:
        args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    args.use_mcore_models = not args.use_legacy_models
    return args


def set_dtype(args, dtype):
    """Keep params_dtype and Megatron's --bf16/--fp16 flags in agreement."""
    args.params_dtype = dtype
    args.bf16 = dtype == torch.bfloat16
    args.fp16 = dtype == torch.float16


def query_groups(args):
    return args.num_query_groups if getattr(args, "group_query_attention", False) else args.num_attention_heads


def head_dim(args):
    return getattr(args, "kv_channels", None) or args.hidden_size // args.num_attention_heads


def ffn_size(args):
    return getattr(args, "ffn_hidden_size", None) or 4 * args.hidden_size


def moe_layers(args):
    """Per layer, whether it is a mixture-of-experts layer: Megatron-LM's moe_layer_freq, an int N (every
    Nth layer from the first) or a 0/1 list with one entry per layer."""
    frequency = getattr(args, "moe_layer_freq", 1)
    if isinstance(frequency, list):
        frequency = tuple(frequency)
    if not isinstance(frequency, (int, tuple)):
        frequency = repr(frequency)  # refused below, in the same words; the cache needs a hashable key
    return _moe_pattern(args.num_layers, bool(getattr(args, "num_experts", None)), frequency)


@functools.lru_cache(maxsize=64)
def _moe_pattern(num_layers, experts, frequency):
    """moe_layers' answer, computed once per model (it is asked for every layer)."""
    if not experts:
        return (False,) * num_layers
    if isinstance(frequency, int) and not isinstance(frequency, bool):
        require(frequency >= 1, f"moe_layer_freq {frequency} must be at least 1")
        return tuple(i % frequency == 0 for i in range(num_layers))
    require(isinstance(frequency, tuple) and len(frequency) == num_layers and all(v in (0, 1) for v in frequency),
            f"moe_layer_freq {frequency!r:.60} is neither an int nor a 0/1 list of {num_layers} entries")
    return tuple(bool(v) for v in frequency)


def mtp_layers(args):
    """How many multi-token-prediction layers the model has (Megatron-LM's mtp_num_layers; 0 without)."""
    return getattr(args, "mtp_num_layers", None) or 0


def is_moe_layer(args, index):
    """Whether layer `index` is a mixture-of-experts layer. Index num_layers + i is multi-token-prediction
    layer i (Hugging Face numbers it so, and megatron-core's layer_number too), whose transformer layer
    megatron-core builds like the last decoder layer."""
    return moe_layers(args)[min(index, args.num_layers - 1)]


def linear_attention_layers(args):
    """Per layer, whether it is a linear-attention layer (experimental_attention_variant "gated_delta_net"):
    Megatron-LM's linear_attention_freq, an int N (softmax attention on every Nth layer, linear attention on
    the others) or a 0/1 list with one entry per layer (1: linear attention)."""
    if getattr(args, "experimental_attention_variant", None) != "gated_delta_net":
        return (False,) * args.num_layers
    frequency = getattr(args, "linear_attention_freq", None)
    if isinstance(frequency, int) and not isinstance(frequency, bool) and frequency >= 1:
        return tuple((i + 1) % frequency != 0 for i in range(args.num_layers))
    require(isinstance(frequency, (list, tuple)) and len(frequency) == args.num_layers
            and all(v in (0, 1) for v in frequency),
            f"linear_attention_freq {frequency!r:.60} is neither a positive int nor a 0/1 list of {args.num_layers} "
            "entries")
    return tuple(bool(v) for v in frequency)


def is_linear_attention_layer(args, index):
    """Whether layer `index` is a linear-attention layer; multi-token-prediction layers never are."""
    return index < args.num_layers and linear_attention_layers(args)[index]


def expert_ffn_size(args):
    return getattr(args, "moe_ffn_hidden_size", None) or ffn_size(args)


def untied(args):
    return bool(getattr(args, "untie_embeddings_and_output_weights", False))


def layers_per_stage(num_layers, pp, where):
    """Megatron's even pipeline split; uneven first/last stages are not supported here."""
    require(num_layers % pp == 0,
            f"{where}: {num_layers} layers cannot be split evenly over pipeline size {pp}")
    return num_layers // pp


def check_tensor_parallel(args, tp, where):
    """The shapes a TP size must divide, each a one-line refusal instead of a wrong checkpoint."""
    require(tp >= 1, f"{where}: tensor parallel size must be at least 1, got {tp}")
    sizes = [("attention heads", args.num_attention_heads), ("query groups (KV heads)", query_groups(args)),
             ("ffn hidden size", ffn_size(args))]
    if any(moe_layers(args)):
        sizes.append(("expert ffn hidden size", expert_ffn_size(args)))
        if getattr(args, "moe_shared_expert_intermediate_size", None):
            sizes.append(("shared expert ffn hidden size", args.moe_shared_expert_intermediate_size))
    if any(linear_attention_layers(args)):  # in_proj, conv1d, A_log and dt_bias split by key / value heads
        sizes += [("linear-attention key heads", args.linear_num_key_heads),
                  ("linear-attention value heads", args.linear_num_value_heads)]
    if getattr(args, "multi_latent_attention", False) and getattr(args, "transformer_impl", None) == "local":
        # the local spec splits the latent down projections over TP too (TransformerEngine's keeps them whole)
        sizes.append(("kv latent and rope rows", args.kv_lora_rank + args.qk_pos_emb_head_dim))
        if args.q_lora_rank:
            sizes.append(("q latent rows", args.q_lora_rank))
    for what, size in sizes:
        require(size % tp == 0, f"{where}: tensor parallel size {tp} does not divide the {size} {what}")


def plain_copy(args):
    """A shallow copy of a Megatron args Namespace, to change (a saver's parallel sizes, a fold's settings)
    without touching the namespace the loader or the stream holds."""
    return argparse.Namespace(**vars(args))
