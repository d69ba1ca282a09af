"""Multi-latent attention: config.json's low-rank attention sizes -> Megatron's MLA args."""

from converter_core.errors import require
from converter_core.formats.untrusted import is_count


def mla_args(config, where):
    """Megatron's multi-latent attention args from an MLA config.json (the Hugging Face names)."""
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        require(is_count(config.get(name)), f"{where}: {name} must be a positive integer, got {config.get(name)!r:.40}")
    q_lora = config.get("q_lora_rank")
    require(q_lora is None or is_count(q_lora), f"{where}: q_lora_rank must be a positive integer or null")
    require(config["qk_rope_head_dim"] % 2 == 0, f"{where}: qk_rope_head_dim must be even")
    return dict(multi_latent_attention=True, qk_layernorm=True, q_lora_rank=q_lora, kv_lora_rank=config["kv_lora_rank"],
                qk_head_dim=config["qk_nope_head_dim"], qk_pos_emb_head_dim=config["qk_rope_head_dim"],
                v_head_dim=config["v_head_dim"])
