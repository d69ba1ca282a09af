"""Hugging Face Llama-layout families (Llama, Mistral, Qwen2, MiniCPM): a table of names and a few
config fields, mapped to and from the Megatron args and the message stream. Loader and saver both use it.
"""

import collections
import json
import math

import torch

from converter_core import layout, megatron_args
from converter_core.errors import require
from converter_core.formats.untrusted import is_count

Family = collections.namedtuple("Family", "model_type architecture tied_by_default qkv_bias mup")

LLAMA_FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", False, False, False),
    "mistral": Family("mistral", "MistralForCausalLM", False, False, False),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", False, True, False),
}
# MiniCPM 1/2/4: Llama weights plus muP scalars; tied unless the config says otherwise (remote default).
MINICPM_FAMILIES = {"minicpm": Family("minicpm", "MiniCPMForCausalLM", True, False, True)}
FAMILIES = LLAMA_FAMILIES

MUP_SCALARS = ("scale_emb", "scale_depth", "dim_model_base")
MINICPM_AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}

EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Megatron hard-codes these for Llama-3 rope scaling (RotaryEmbedding._apply_scaling).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# config.json's sizes: each must be a positive integer (not 1e9, true or "4"); the optional ones may be
# absent or null.
COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def check_counts(config, where):
    """The sizes of a config.json are positive integers and divide as the model needs; checked before
    anything is computed or sized from them."""
    for name in COUNTS:
        require(name in config, f"{where}: missing field {name!r}")
    for name in COUNTS + OPTIONAL_COUNTS:
        value = config.get(name)
        require(is_count(value) or value is None and name in OPTIONAL_COUNTS,
                f"{where}: {name} must be a positive integer, got {value!r:.40}")
    heads, groups = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    require(heads % groups == 0, f"{where}: {heads} attention heads are not a multiple of {groups} KV heads")
    require(config.get("head_dim") or config["hidden_size"] % heads == 0,
            f"{where}: hidden_size {config['hidden_size']} is not a multiple of {heads} attention heads (and no head_dim)")


def layer_prefix(index):
    return f"model.layers.{index}."


def family_of(config, where, families=FAMILIES):
    model_type = config.get("model_type")
    if model_type is None:
        by_architecture = {f.architecture: f for f in families.values()}
        model_type = next((by_architecture[a].model_type for a in config.get("architectures") or []
                           if a in by_architecture), None)
    require(model_type in families,
            f"{where}: model_type {model_type!r} is not one of {', '.join(sorted(families))}")
    return families[model_type]


def rope_settings(config):
    """(rope_theta, scaling dict or None) from either config style: transformers 5's rope_parameters
    or the older rope_theta + rope_scaling ("type" or "rope_type")."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta"}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return float(theta), scaling


def rope_args(config, where, family):
    """Megatron's rotary arguments for a config; refuses settings Megatron cannot express.

    Llama-3 scaling maps to Megatron-Core's own; MiniCPM's LongRoPE to the arguments Megatron forks
    use for it (rope_scaling_type, long_factor, short_factor, ...); MiniCPM's dynamic NTK equals plain
    rope up to max_position_embeddings, so only the stored config.json keeps it."""
    theta, scaling = rope_settings(config)
    fields = {"rotary_base": theta}
    kind = scaling and scaling.get("rope_type")
    if kind is None or kind == "dynamic" and family.mup:
        return fields
    if kind == "longrope" and family.mup:
        half = (config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]) // 2
        for name in ("long_factor", "short_factor"):
            require(len(scaling.get(name) or ()) == half, f"{where}: LongRoPE {name} needs {half} entries")
        fields.update(rope_scaling_type="longrope", long_factor=[float(f) for f in scaling["long_factor"]],
                      short_factor=[float(f) for f in scaling["short_factor"]],
                      rope_scaling_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
        return fields
    require(kind == "llama3" and not family.mup, f"{where}: rope scaling {kind!r} has no Megatron-Core equivalent")
    for name, value in LLAMA3_FIXED.items():
        require(float(scaling.get(name, value)) == value,
                f"{where}: llama3 rope scaling with {name}={scaling.get(name)} cannot be expressed in "
                f"Megatron-Core (it fixes {name}={value})")
    fields.update(use_rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    return fields


def args_from_config(config, where, dtype, untied, families=FAMILIES, **fields):
    """Megatron args for an HF config. The whole config.json rides along as `hf_config_json`, so a
    later HF saver can write back every field Megatron has no name for."""
    family = family_of(config, where, families)
    check_counts(config, where)
    require(config.get("hidden_act", "silu") == "silu",
            f"{where}: hidden_act {config.get('hidden_act')!r} is not supported (SwiGLU with silu only)")
    require(not config.get("mlp_bias"), f"{where}: mlp_bias=true has no Megatron-Core equivalent here")
    require(not config.get("attention_bias") or family.qkv_bias,
            f"{where}: attention_bias=true (biases on q, k, v and o) has no Megatron-Core equivalent")
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    fields.update(rope_args(config, where, family))
    if family.mup:
        for name in MUP_SCALARS:
            value = config.get(name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool),
                    f"{where}: {name} is missing; MiniCPM's remote default (1) is silently wrong, so it must be given")
            require(math.isfinite(value) and value > 0, f"{where}: {name} must be a positive number, got {value!r}")
            fields[name] = value
    return megatron_args.make_args(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        max_position_embeddings=config.get("max_position_embeddings") or 4096,
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        vocab_size=config["vocab_size"],
        params_dtype=dtype,
        add_qkv_bias=family.qkv_bias,
        untie_embeddings_and_output_weights=untied,
        hf_config_json=json.dumps(config, sort_keys=True),
        **fields)


def stored_config(args):
    text = getattr(args, "hf_config_json", None)
    return json.loads(text) if text else None


def has_mup(args):
    return any(getattr(args, name, None) is not None for name in MUP_SCALARS)


def mup_scalars(args):
    """(scale_emb, scale_depth, dim_model_base); a stream without them is the identity MiniCPM."""
    if has_mup(args):
        return tuple(getattr(args, name) for name in MUP_SCALARS)
    return 1, math.sqrt(args.num_layers), args.hidden_size


def longrope_static_choice(args):
    """(factors, cos/sin multiplier) MiniCPM's remote code uses: it builds its rope cache once at
    max_position_embeddings, so long factors only when that exceeds the original length."""
    original, maximum = args.rope_scaling_original_max_position_embeddings, args.max_position_embeddings
    factors = args.long_factor if maximum > original else args.short_factor
    return list(factors), math.sqrt(1 + math.log(maximum / original) / math.log(original))


def config_from_args(args, vocab_size, families=FAMILIES):
    """config.json for the model in `args`: the stored HF config when there is one, with every field
    Megatron knows taken from the args (they win: the checkpoint may have been changed since)."""
    stored = stored_config(args)
    config = dict(stored) if stored else {}
    if stored:
        family = family_of(stored, "hf_config_json in the checkpoint args", families)
    else:
        family = families["qwen2"] if args.add_qkv_bias and "qwen2" in families else next(iter(families.values()))
    groups = megatron_args.query_groups(args)
    config.update(
        architectures=[family.architecture],
        hidden_size=args.hidden_size,
        intermediate_size=megatron_args.ffn_size(args),
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=groups,
        hidden_act="silu",
        rms_norm_eps=args.norm_epsilon,
        max_position_embeddings=args.max_position_embeddings,
        vocab_size=vocab_size,
    )
    tied = not megatron_args.untied(args)
    if not stored or "tie_word_embeddings" in stored or tied != family.tied_by_default:
        config["tie_word_embeddings"] = tied  # a stored config that relied on the default keeps doing so
    if not stored or "model_type" in stored:
        config["model_type"] = family.model_type  # MiniCPM hub configs have none; keep it that way
    head_dim = megatron_args.head_dim(args)
    if "head_dim" in config or head_dim != args.hidden_size // args.num_attention_heads:
        config["head_dim"] = head_dim
    if family.model_type == "llama":
        config.setdefault("attention_bias", False)
        config.setdefault("mlp_bias", False)
    if family.mup:
        config.update(zip(MUP_SCALARS, mup_scalars(args)))  # always explicit: the remote defaults are wrong
        config.setdefault("auto_map", MINICPM_AUTO_MAP)
    _set_rope(config, args, family)
    dtype_key = "dtype" if "dtype" in config or "torch_dtype" not in config and stored else "torch_dtype"
    config[dtype_key] = DTYPE_NAMES[args.params_dtype]
    return config


MINICPM_ONLY_FIELDS = MUP_SCALARS + ("auto_map", "mup_denominator", "rope_scaling", "rope_parameters",
                                     "model_type", "architectures", "_name_or_path", "sparse_config")


def folded_llama_args(args, where):
    """Args for writing a MiniCPM stream as a plain LlamaForCausalLM (scalars folded into the weights).
    Settings a Llama cannot reproduce are refused rather than written as a different model."""
    stored = stored_config(args) or {}
    require(not stored.get("sparse_config"),
            f"{where}: sparse_config (InfLLM v2 sparse attention) has no Llama equivalent; use --saver minicpm_hf")
    _, scaling = rope_settings(stored)
    require(not scaling or scaling.get("rope_type") == "longrope",
            f"{where}: MiniCPM rope scaling {scaling and scaling.get('rope_type')!r} has no Llama equivalent; "
            "use --saver minicpm_hf")
    llama = {k: v for k, v in stored.items() if k not in MINICPM_ONLY_FIELDS}
    llama.update(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    folded = megatron_args.plain_copy(args)
    folded.hf_config_json = json.dumps(llama, sort_keys=True)
    folded.untie_embeddings_and_output_weights = True  # embeddings x scale_emb, head / width: never equal
    return folded


def _rope_from_args(args, family):
    """The rope scaling dict the args describe, in the target family's own semantics."""
    if getattr(args, "use_rope_scaling", False):
        return {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), **LLAMA3_FIXED}
    kind = getattr(args, "rope_scaling_type", None)
    if kind != "longrope":
        require(kind is None, f"rope scaling {kind!r} in the checkpoint args is not supported")
        return None
    original = args.rope_scaling_original_max_position_embeddings
    if family.mup:
        return {"rope_type": "longrope", "long_factor": list(args.long_factor),
                "short_factor": list(args.short_factor), "original_max_position_embeddings": original}
    # transformers' Llama picks short or long per call and scales by its own attention factor; pinning
    # both lists and the factor to MiniCPM's static choice gives the same frequencies at every length.
    factors, multiplier = longrope_static_choice(args)
    return {"rope_type": "longrope", "long_factor": factors, "short_factor": factors,
            "original_max_position_embeddings": original, "attention_factor": multiplier}


def _set_rope(config, args, family):
    """Write the args' rotary settings in the config's own style, unless it already says the same."""
    scaling = _rope_from_args(args, family)
    theta, current = rope_settings(config)
    if config and theta == float(args.rotary_base) and _same_scaling(current, scaling):
        return
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": float(args.rotary_base), **(scaling or {})}
    else:
        config["rope_theta"] = float(args.rotary_base)
        config["rope_scaling"] = scaling


def _same_scaling(current, wanted):
    if wanted is None:  # dynamic NTK has no Megatron form; the stored config keeps it
        return current is None or current.get("rope_type") == "dynamic"
    if current is None or current.get("rope_type") != wanted["rope_type"]:
        return False
    return all(current.get(k) == v if isinstance(v, list) else float(current.get(k, -1)) == float(v)
               for k, v in wanted.items() if k != "rope_type")


def expected_shapes(args, vocab_rows):
    """{hf name: shape} of every tensor of the model, in file order."""
    hidden, heads, groups = args.hidden_size, args.num_attention_heads, megatron_args.query_groups(args)
    head_dim, ffn = megatron_args.head_dim(args), megatron_args.ffn_size(args)
    shapes = {EMBED: (vocab_rows, hidden)}
    for i in range(args.num_layers):
        p = layer_prefix(i)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (groups * head_dim, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (groups * head_dim, hidden)
        if args.add_qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (groups * head_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (groups * head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, hidden)
        shapes[p + "mlp.up_proj.weight"] = (ffn, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, ffn)
    shapes[NORM] = (hidden,)
    if megatron_args.untied(args):
        shapes[LM_HEAD] = (vocab_rows, hidden)
    return shapes


def layer_to_message(tensors, index, args):
    """HF tensors of layer `index` (a dict by full HF name) -> the Megatron message."""
    p = layer_prefix(index)
    heads, groups, head_dim = args.num_attention_heads, megatron_args.query_groups(args), megatron_args.head_dim(args)
    attention = p + "self_attn."
    message = {
        "input norm weight": tensors[p + "input_layernorm.weight"],
        "qkv weight": layout.hf_qkv_to_megatron(tensors[attention + "q_proj.weight"], tensors[attention + "k_proj.weight"],
                                                tensors[attention + "v_proj.weight"], heads, groups, head_dim),
        "dense weight": tensors[attention + "o_proj.weight"],
        "post norm weight": tensors[p + "post_attention_layernorm.weight"],
        "mlp l0 weight W": tensors[p + "mlp.gate_proj.weight"],
        "mlp l0 weight V": tensors[p + "mlp.up_proj.weight"],
        "mlp l1 weight": tensors[p + "mlp.down_proj.weight"],
    }
    if args.add_qkv_bias:
        message["qkv bias"] = layout.hf_qkv_to_megatron(tensors[attention + "q_proj.bias"], tensors[attention + "k_proj.bias"],
                                                        tensors[attention + "v_proj.bias"], heads, groups, head_dim)
    return message


def message_to_layer(message, index, args):
    """The inverse of layer_to_message; pops what it uses so the receiver can check for leftovers."""
    p = layer_prefix(index)
    attention = p + "self_attn."
    heads, groups, head_dim = args.num_attention_heads, megatron_args.query_groups(args), megatron_args.head_dim(args)
    q, k, v = layout.megatron_qkv_to_hf(message.pop("qkv weight"), heads, groups, head_dim)
    tensors = {
        p + "input_layernorm.weight": message.pop("input norm weight"),
        attention + "q_proj.weight": q, attention + "k_proj.weight": k, attention + "v_proj.weight": v,
        attention + "o_proj.weight": message.pop("dense weight"),
        p + "post_attention_layernorm.weight": message.pop("post norm weight"),
        p + "mlp.gate_proj.weight": message.pop("mlp l0 weight W"),
        p + "mlp.up_proj.weight": message.pop("mlp l0 weight V"),
        p + "mlp.down_proj.weight": message.pop("mlp l1 weight"),
    }
    if args.add_qkv_bias:
        q, k, v = layout.megatron_qkv_to_hf(message.pop("qkv bias"), heads, groups, head_dim)
        tensors.update({attention + "q_proj.bias": q, attention + "k_proj.bias": k, attention + "v_proj.bias": v})
    return tensors
