"""config.json <-> Megatron args for a family: the sizes every decoder has, then each feature's own
fields (norm, activation, experts, rope, a plugin's), with the whole config.json carried along so a
later HF saver can write back every field Megatron has no name for."""

import json

import torch

from converter_core.errors import require
from converter_core.formats.untrusted import is_count
from converter_core.hf_family.family import stored_config
from converter_core.hf_family.rope import config_value, rope_args, set_config_value, set_rope
from converter_core.megatron import args as megatron_args

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# config.json's sizes: each must be a positive integer (not 1e9, true or "4"); the optional ones may be
# absent or null.
COUNTS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")

# Fields of one family's config.json that mean nothing (or something else) in another's.
FAMILY_ONLY_FIELDS = ("model_type", "architectures", "auto_map", "_name_or_path")


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


def args_from_config(config, where, dtype, untied, family, **fields):
    """Megatron args for an HF config of `family`. The whole config.json rides along as
    `hf_config_json`, so a later HF saver can write back every field Megatron has no name for."""
    whole, config = config, family.decoder_config(config, where)
    check_counts(config, where)
    heads = config["num_attention_heads"]
    groups = config.get("num_key_value_heads") or heads
    fields.update(rope_args(config, where, family))
    for part in family.parts:
        fields.update(part.to_args(config, where, family))
    fields.update({arg: config_value(config, key) for key, arg in family.fields.items()
                   if config_value(config, key) is not None})
    fields.update(family.args)
    if family.config_key:  # where the decoder's fields are in hf_config_json, for a saver of another family
        fields.update(hf_config_key=family.config_key)
    return megatron_args.make_args(
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=config.get("head_dim") or config["hidden_size"] // heads,
        max_position_embeddings=config.get("max_position_embeddings") or 4096,
        where=where,
        vocab_size=config["vocab_size"],
        params_dtype=dtype,
        untie_embeddings_and_output_weights=untied,
        hf_config_json=json.dumps(whole, sort_keys=True),
        **fields)


def config_from_args(args, vocab_size, family):
    """config.json for the model in `args` as `family`: the stored HF config when there is one, with
    every field Megatron knows taken from the args (they win: the checkpoint may have been changed since).
    A family with a config_key gets them in that object, inside the stored outer one (or its `outer`)."""
    stored = stored_config(args)
    if stored and stored.get("model_type", family.model_type) != family.model_type:
        source_key = getattr(args, "hf_config_key", None)  # another family's decoder object inside the stored one
        stored = retargeted(stored.get(source_key, stored) if source_key else stored, family)
        if family.config_key:  # another family's fields are the decoder's; the outer object is this family's
            stored = dict(family.outer, model_type=family.model_type, architectures=[family.architecture],
                          **{family.config_key: {k: v for k, v in stored.items() if k != "model_type"}})
    if not family.config_key:
        return decoder_config_from_args(args, vocab_size, family, stored)
    outer = dict(stored) if stored else dict(family.outer, model_type=family.model_type)
    decoder = family.decoder_config(stored) if stored else None
    outer.update(architectures=[family.architecture],
                 **{family.config_key: decoder_config_from_args(args, vocab_size, family, decoder)})
    return outer


def decoder_config_from_args(args, vocab_size, family, stored):
    """The object of config_from_args holding the decoder's fields (config.json itself for a family without
    a config_key), starting from `stored`, the stored one, or None."""
    config = dict(stored) if stored else {}
    groups = megatron_args.query_groups(args)
    if not family.config_key:
        config["architectures"] = [family.architecture]
    config.update(
        hidden_size=args.hidden_size,
        intermediate_size=megatron_args.ffn_size(args),
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=groups,
    )
    family.activation.to_config(config, args, family)
    family.norm.to_config(config, args, family)
    config.update(max_position_embeddings=args.max_position_embeddings, vocab_size=vocab_size)
    tied = not megatron_args.untied(args)
    if not stored or "tie_word_embeddings" in stored or tied != family.tied_by_default:
        config["tie_word_embeddings"] = tied  # a stored config that relied on the default keeps doing so
    if not family.config_key and (not stored or "model_type" in stored):
        config["model_type"] = family.model_type  # a hub config without one keeps it that way
    head_dim = megatron_args.head_dim(args)
    if not family.mla and (config.get("head_dim") is not None or head_dim != args.hidden_size // args.num_attention_heads):
        config["head_dim"] = head_dim
    for name, value in family.config.items():
        config.setdefault(name, value)
    for key, arg in family.fields.items():
        if getattr(args, arg, None) is not None:
            set_config_value(config, key, getattr(args, arg))
    for part in family.features + tuple(part for part in (family.experts, family.mtp, family.mla) if part):
        part.to_config(config, args, family)
    set_rope(config, args, family, stored is not None)
    dtype_key = "dtype" if "dtype" in config or "torch_dtype" not in config and stored else "torch_dtype"
    config[dtype_key] = DTYPE_NAMES[args.params_dtype]
    return config


def retargeted(config, family):
    """A stored config.json of another family as a starting point for `family`'s: the fields naming the
    family or its code go (the args supply the model's shape and rope)."""
    kept = {k: v for k, v in config.items() if k not in FAMILY_ONLY_FIELDS}
    return dict(kept, model_type=family.model_type)
