"""Rotary position settings: config.json's rope (either transformers style) <-> Megatron's rotary args.
Llama-3 scaling and GPT YaRN are Megatron-Core's own; a family feature may own another rope type through
its rope_args / rope_scaling hooks (multi-latent attention's YaRN: mla.py)."""

from converter_core.errors import require

# Megatron hard-codes these for Llama-3 rope scaling (RotaryEmbedding._apply_scaling).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

ROPE_EXTRAS = ("partial_rotary_factor",)  # in transformers 5's rope_parameters beside the scaling


def config_value(config, key):
    """A config.json field, top-level or (transformers 5) inside rope_parameters."""
    parameters = config.get("rope_parameters")
    if key not in config and isinstance(parameters, dict):
        return parameters.get(key)
    return config.get(key)


def set_config_value(config, key, value):
    """Set a field where the config keeps it: top-level, inside rope_parameters (a rope extra of a
    transformers 5 config), or both (transformers 5 writes partial_rotary_factor twice)."""
    parameters = config.get("rope_parameters")
    inside = isinstance(parameters, dict) and (key in parameters or key in ROPE_EXTRAS and key not in config)
    if inside:
        config["rope_parameters"] = dict(parameters, **{key: value})
    if key in config or not inside:
        config[key] = value


def rope_settings(config):
    """(rope_theta, scaling dict or None) from either config style: transformers 5's rope_parameters
    or the older rope_theta + rope_scaling ("type" or "rope_type")."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict):
        theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in parameters.items() if k != "rope_theta" and k not in ROPE_EXTRAS}
    else:
        theta = config.get("rope_theta", 10000.0)
        scaling = dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return float(theta), scaling


def rope_args(config, where, family):
    """Megatron's rotary arguments for a config; refuses settings Megatron cannot express."""
    theta, scaling = rope_settings(config)
    partial = config_value(config, "partial_rotary_factor")
    require(partial in (None, 1, 1.0) or "partial_rotary_factor" in family.fields,
            f"{where}: partial_rotary_factor {partial!r:.20} is not supported for {family.model_type} (it has no field "
            "for it)")
    fields = {"rotary_base": theta}
    kind = scaling and scaling.get("rope_type")
    for part in family.parts:
        owned = part.rope_args(kind, scaling, config, where, family)
        if owned is not None:
            return dict(fields, **owned)
    if kind is None:
        return fields
    if kind == "yarn":  # Megatron-Core's GPT yarn embedding; truncate=false is its unrounded correction range
        truncate = scaling.get("truncate", True)
        yarn = yarn_args({k: v for k, v in scaling.items() if k != "truncate"}, config, where)
        return dict(fields, **yarn, position_embedding_type="yarn", yarn_correction_range_round_to_int=bool(truncate))
    require(kind == "llama3", f"{where}: rope scaling {kind!r} has no Megatron-Core equivalent")
    for name, value in LLAMA3_FIXED.items():
        require(float(scaling.get(name, value)) == value,
                f"{where}: llama3 rope scaling with {name}={scaling.get(name)} cannot be expressed in "
                f"Megatron-Core (it fixes {name}={value})")
    fields.update(use_rope_scaling=True, rope_scaling_factor=float(scaling["factor"]))
    return fields


# Megatron-LM's yarn args (MLA) and the HF rope_parameters key of each.
YARN_FIELDS = (("rotary_scaling_factor", "factor"), ("yarn_original_max_position_embeddings",
               "original_max_position_embeddings"), ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
               ("mscale", "mscale"), ("mscale_all_dim", "mscale_all_dim"))
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def yarn_args(scaling, config, where):
    """Megatron-Core's YaRN args (GPT's and MLA's) from an HF yarn rope_scaling; refuses what it computes
    differently."""
    values = dict(YARN_DEFAULTS, **{k: v for k, v in scaling.items() if v is not None})
    values.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    require(isinstance(values.get("factor"), (int, float)) and values["factor"] > 0,
            f"{where}: yarn rope scaling needs a positive factor")
    require(values.get("attention_factor") is None and values.get("truncate", True),
            f"{where}: yarn attention_factor / truncate=false have no Megatron-Core equivalent")
    require(values["mscale"] == 1.0 or values["mscale_all_dim"],
            f"{where}: yarn mscale {values['mscale']} without mscale_all_dim differs between Megatron-Core and "
            "transformers")
    return {arg: (int if arg == "yarn_original_max_position_embeddings" else float)(values[key])
            for arg, key in YARN_FIELDS} | {"rope_type": "yarn"}


def rope_scaling_from_args(args, family):
    """The rope scaling dict the args describe, in the target family's own semantics."""
    if getattr(args, "use_rope_scaling", False):
        return {"rope_type": "llama3", "factor": float(args.rope_scaling_factor), **LLAMA3_FIXED}
    if getattr(args, "position_embedding_type", None) == "yarn":
        scaling = yarn_scaling(args)
        if scaling and getattr(args, "yarn_correction_range_round_to_int", None) is False:
            scaling["truncate"] = False
        return scaling
    for part in family.parts:
        owned = part.rope_scaling(args, family)
        if owned is not None:
            return owned
    kind = getattr(args, "rope_scaling_type", None)
    require(kind is None, f"rope scaling {kind!r} in the checkpoint args is not supported")
    return None


def yarn_scaling(args):
    """The HF yarn dict of Megatron's YaRN args; None for factor 1, which is plain rope."""
    values = {key: getattr(args, arg) for arg, key in YARN_FIELDS}
    if values["factor"] in (None, 1.0):
        return None
    if values["original_max_position_embeddings"] is None:
        values["original_max_position_embeddings"] = args.max_position_embeddings
    return {"rope_type": "yarn", **{k: v for k, v in values.items() if v is not None}}


def set_rope(config, args, family, stored):
    """Write the args' rotary settings in the config's own style, unless the config (`stored`: the one
    the stream came from) already says the same."""
    scaling = rope_scaling_from_args(args, family)
    theta, current = rope_settings(config)
    if stored and theta == float(args.rotary_base) and _same_scaling(current, scaling):
        return  # a config made from args alone always states theta (family defaults differ)
    if isinstance(config.get("rope_parameters"), dict):
        extras = {k: v for k, v in config["rope_parameters"].items() if k in ROPE_EXTRAS}
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": float(args.rotary_base), **extras,
                                     **(scaling or {})}
    else:
        config["rope_theta"] = float(args.rotary_base)
        config["rope_scaling"] = scaling


def _same_scaling(current, wanted):
    if wanted is None:  # a scaling the load accepted without args (dynamic NTK): the stored config keeps it
        return current is None or current.get("rope_type") == "dynamic"
    if current is None or current.get("rope_type") != wanted["rope_type"]:
        return False
    return all(current.get(k) == v if isinstance(v, list) else float(current.get(k, YARN_DEFAULTS.get(k, -1))) == float(v)
               for k, v in wanted.items() if k != "rope_type")
