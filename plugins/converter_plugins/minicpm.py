"""MiniCPM's own rules, as family features: muP scalars (scale_emb, scale_depth, dim_model_base) carried
in the Megatron args and folded into the weights when written as a family without them, and LongRoPE
carried under the names Megatron forks use for it (rope_scaling_type, long_factor, short_factor, ...)."""

import dataclasses
import json
import math

from converter_core import plugin

SCALARS = ("scale_emb", "scale_depth", "dim_model_base")
# config.json fields that mean something only in MiniCPM's code (dropped when folding to another family).
ONLY_FIELDS = SCALARS + ("mup_denominator", "rope_scaling", "rope_parameters", "sparse_config")


def scalars(args):
    """(scale_emb, scale_depth, dim_model_base); a stream without them is the identity MiniCPM."""
    if MuP().carried_by(args):
        return tuple(getattr(args, name) for name in SCALARS)
    return 1, math.sqrt(args.num_layers), args.hidden_size


@dataclasses.dataclass(frozen=True)
class MuP(plugin.Feature):
    """muP: embeddings times scale_emb, each residual branch times scale_depth / sqrt(layers), the logits
    divided by hidden / dim_model_base. Megatron forks for MiniCPM read the same three args."""

    def to_args(self, config, where, family):
        fields = {}
        for name in SCALARS:
            value = config.get(name)
            plugin.require(isinstance(value, (int, float)) and not isinstance(value, bool),
                           f"{where}: {name} is missing; MiniCPM's remote default (1) is silently wrong, so it must "
                           "be given")
            plugin.require(math.isfinite(value) and value > 0, f"{where}: {name} must be a positive number, got {value!r}")
            fields[name] = value
        return fields

    def to_config(self, config, args, family):
        config.update(zip(SCALARS, scalars(args)))  # always explicit: the remote defaults are wrong

    def carried_by(self, args):
        return any(getattr(args, name, None) is not None for name in SCALARS)

    def fold(self, args, family, where):
        """Write as `family` (a plain Llama-style one) with the scalars multiplied into the weights; settings
        it cannot reproduce are refused rather than written as a different model."""
        stored, name = plugin.stored_config(args) or {}, family.architecture.removesuffix("ForCausalLM")
        plugin.require(not stored.get("sparse_config"), f"{where}: sparse_config (InfLLM v2 sparse attention) has no "
                                                        f"{name} equivalent; use --saver minicpm_hf")
        _, scaling = plugin.rope_settings(stored)
        plugin.require(not scaling or scaling.get("rope_type") == "longrope",
                       f"{where}: MiniCPM rope scaling {scaling and scaling.get('rope_type')!r} has no {name} "
                       "equivalent; use --saver minicpm_hf")
        plain = {k: v for k, v in plugin.retargeted(stored, family).items() if k not in ONLY_FIELDS}
        plain.update(architectures=[family.architecture], tie_word_embeddings=False)
        folded = plugin.plain_copy(args)
        folded.hf_config_json = json.dumps(plain, sort_keys=True)
        folded.untie_embeddings_and_output_weights = True  # embeddings x scale_emb, head / width: never equal
        scale_emb, scale_depth, dim_model_base = scalars(args)
        residual, width = scale_depth / math.sqrt(args.num_layers), args.hidden_size / dim_model_base
        note = (f"folded MiniCPM's muP scalars into the weights for {family.architecture}: embeddings x{scale_emb:g}, "
                f"attention and MLP outputs x{residual:.6g}, output layer /{width:g} (untied)")
        return plugin.Fold(folded, dataclasses.replace(family, features=family.features + (LongRopeAsTransformers(),)),
                           embeddings=scale_emb, layer={"dense weight": residual, "mlp l1 weight": residual},
                           output=1 / width, note=note)


def static_longrope(args):
    """(factors, cos/sin multiplier) MiniCPM's remote code uses up to max_position_embeddings: it builds
    its rope cache at that length, so long factors only when it exceeds the original length. A longer
    input rebuilds the cache at its own length (long factors past the original), same multiplier."""
    original, maximum = args.rope_scaling_original_max_position_embeddings, args.max_position_embeddings
    factors = args.long_factor if maximum > original else args.short_factor
    return list(factors), math.sqrt(1 + math.log(maximum / original) / math.log(original))


@dataclasses.dataclass(frozen=True)
class Rope(plugin.Feature):
    """MiniCPM's rope scalings: LongRoPE to the Megatron fork args; dynamic NTK equals plain rope up to
    max_position_embeddings, so only the stored config.json keeps it; llama3 scaling is not in its code."""

    def rope_args(self, kind, scaling, config, where, family):
        if kind == "dynamic":
            return {}
        plugin.require(kind != "llama3", f"{where}: rope scaling 'llama3' has no Megatron-Core equivalent here")
        if kind != "longrope":
            return None
        rotated = family.mla.rotary_dim(config) if family.mla else config.get("head_dim")
        half = (rotated or config["hidden_size"] // config["num_attention_heads"]) // 2
        for name in ("long_factor", "short_factor"):
            plugin.require(len(scaling.get(name) or ()) == half, f"{where}: LongRoPE {name} needs {half} entries")
        return dict(rope_scaling_type="longrope", long_factor=[float(f) for f in scaling["long_factor"]],
                    short_factor=[float(f) for f in scaling["short_factor"]],
                    rope_scaling_original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))

    def rope_scaling(self, args, family):
        if getattr(args, "rope_scaling_type", None) != "longrope":
            return None
        return {"rope_type": "longrope", "long_factor": list(args.long_factor), "short_factor": list(args.short_factor),
                "original_max_position_embeddings": args.rope_scaling_original_max_position_embeddings}


@dataclasses.dataclass(frozen=True)
class LongRopeAsTransformers(plugin.Feature):
    """MiniCPM's LongRoPE written for transformers' own longrope (a folded Llama)."""

    def rope_scaling(self, args, family):
        if getattr(args, "rope_scaling_type", None) != "longrope":
            return None
        # transformers' Llama takes long factors for inputs longer than the original length, else short, and
        # scales by attention_factor. MiniCPM does the same except that up to max_position_embeddings it uses
        # long ones whenever that exceeds the original length: short_factor is its choice there, long_factor
        # stays, and attention_factor is MiniCPM's (fixed by max_position_embeddings, never clamped).
        # (A MiniCPM model object keeps its grown cache after a long input; the Llama matches a fresh one.)
        factors, multiplier = static_longrope(args)
        return {"rope_type": "longrope", "long_factor": list(args.long_factor), "short_factor": factors,
                "original_max_position_embeddings": args.rope_scaling_original_max_position_embeddings,
                "attention_factor": multiplier}


FEATURES = plugin.LLAMA_BIAS_SWITCHES + (MuP(), Rope())
# The first SDK's Family(mup=True): these two features beside Llama's bias switches.
plugin.deprecate_switch("mup", (MuP(), Rope()), "features=converter_plugins.minicpm.FEATURES (Llama's bias switches, "
                                                "minicpm.MuP() and minicpm.Rope())")
FOLDS = (MuP(),)  # what a saver of plain families folds away
