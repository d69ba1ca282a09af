"""Multi-latent attention as a family feature: config.json's low-rank attention sizes <-> Megatron's MLA
args, the rope rules of Megatron-Core's MLA (plain rope or YaRN, nothing else) and the order of the rope
rows, in one place."""

import dataclasses

from converter_core.errors import require
from converter_core.formats.untrusted import is_count
from converter_core.hf_family.features import Feature
from converter_core.hf_family.rope import rope_settings, yarn_args, yarn_scaling

# config.json's MLA sizes -> Megatron's args (q_lora_rank apart: it may be null).
SIZES = (("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_head_dim"),
         ("qk_rope_head_dim", "qk_pos_emb_head_dim"), ("v_head_dim", "v_head_dim"))
WHAT_TO_WRITE = ("an MLA config.json gives kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and v_head_dim as "
                 "positive integers and q_lora_rank as one or null; a family with standard attention leaves "
                 "Family(mla=...) unset")


@dataclasses.dataclass(frozen=True)
class Mla(Feature):
    """Multi-latent attention: config.json's q_lora_rank (null: one query projection), kv_lora_rank,
    qk_nope_head_dim, qk_rope_head_dim and v_head_dim are Megatron's multi_latent_attention sizes, with
    qk_layernorm (MLA's latent norms). Megatron-Core's MLA computes plain rope or YaRN, its rope pairs
    interleaved: `rope_interleaved` is True when the family's rope is so too, False for rotate-half (the
    rope rows are then reordered both ways), or the config.json key saying which (absent meaning true)."""
    rope_interleaved: object = True

    def to_args(self, config, where, family):
        for key, _ in SIZES:
            require(is_count(config.get(key)), f"{where}: multi-latent attention needs {key}, got "
                                               f"{config.get(key)!r:.40} ({WHAT_TO_WRITE})")
        q_lora = config.get("q_lora_rank")
        require(q_lora is None or is_count(q_lora),
                f"{where}: multi-latent attention's q_lora_rank must be a positive integer or null, got {q_lora!r:.40}")
        require(config["qk_rope_head_dim"] % 2 == 0,
                f"{where}: multi-latent attention's qk_rope_head_dim {config['qk_rope_head_dim']} must be even "
                "(its rope rotates pairs)")
        self.interleaved(config, where)
        _, scaling = rope_settings(config)
        yarn = scaling is not None and scaling.get("rope_type") == "yarn"  # rope_args mapped it
        return dict(multi_latent_attention=True, qk_layernorm=True, q_lora_rank=q_lora,
                    rope_type="yarn" if yarn else "rope",  # Megatron's MLA default is yarn: always say which
                    **{arg: config[key] for key, arg in SIZES})

    def to_config(self, config, args, family):
        config.update({key: getattr(args, arg) for key, arg in SIZES}, q_lora_rank=args.q_lora_rank)
        if "head_dim" in config or "qk_head_dim" in config:  # transformers writes both, derived
            config.update(head_dim=args.qk_pos_emb_head_dim, qk_head_dim=args.qk_head_dim + args.qk_pos_emb_head_dim)

    def settings(self):
        return {"multi_latent_attention": True}

    def rope_args(self, kind, scaling, config, where, family):
        """YaRN as Megatron-Core's MLA computes it; any other scaling (one a feature before this did not
        own) is refused, since MLA's rope is plain or YaRN."""
        if kind is None:
            return None
        require(kind == "yarn", f"{where}: rope scaling {kind!r} with multi-latent attention has no Megatron-Core "
                                "equivalent (its MLA rope is plain or YaRN: rope_type \"yarn\")")
        return yarn_args(scaling, config, where)

    def rope_scaling(self, args, family):
        """Megatron's MLA YaRN (rope_type "yarn", or unset: its default) as an HF yarn dict."""
        if getattr(args, "multi_latent_attention", False) and getattr(args, "rope_type", None) in (None, "yarn"):
            return yarn_scaling(args)
        return None

    def interleaved(self, config, where="config.json"):
        """Whether the rope of a model whose config.json (its decoder object) is `config` rotates
        interleaved pairs, as Megatron-Core's MLA does."""
        if not isinstance(self.rope_interleaved, str):
            return self.rope_interleaved
        value = config.get(self.rope_interleaved, True)
        require(isinstance(value, bool), f"{where}: {self.rope_interleaved} must be true or false, got {value!r:.40}")
        return value

    def rotary_dim(self, config):
        """How many of each head's query and key channels rope rotates (a rope scaling's size)."""
        return config.get("qk_rope_head_dim")
