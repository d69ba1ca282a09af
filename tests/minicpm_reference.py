"""MiniCPM (model_type "minicpm") as an independent truth for the converter's tests.

transformers has no class for MiniCPM-1/2/4 (remote code only), so the forward is written here from
the formulas of the reference modeling_minicpm.py (/work/shared/reference/minicpm.md section 2) and
cross-checked against transformers' LlamaForCausalLM with the muP scalars folded into the weights.
`save_minicpm_mcore_checkpoint` writes the same model as a Megatron-LM per-rank torch checkpoint by
hand, for mcore_harness to run in megatron-core.

Nothing here imports converter_core: the converter is judged against this module.
"""

import argparse
import json
import math
import os
import shutil

import torch
from safetensors.torch import save_file

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

# Fields of a real MiniCPM4-0.5B config.json that do not depend on the model's size.
AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}
MAX_POSITIONS = 256
# Stand-ins for the remote-code files a MiniCPM folder carries (tests/minicpm_remote_code).
REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minicpm_remote_code")
REMOTE_CODE_FILES = ("configuration_minicpm.py", "modeling_minicpm.py")

# Defaults of the remote MiniCPMConfig, used when a config.json lacks the field (minicpm.md, section 1).
REMOTE_DEFAULTS = {"rope_theta": 10000.0, "tie_word_embeddings": True, "scale_emb": 1, "scale_depth": 1,
                   "dim_model_base": 1}


def minicpm_config(*, tied=True, kv_heads=2, longrope=True, layers=4, hidden=64, heads=4, intermediate=160,
                   vocab=96, base=None):
    """A tiny MiniCPM config.json dict shaped like the real MiniCPM4-0.5B one.

    The muP scalars are the real ones (scale_emb 12, scale_depth 1.4) and dim_model_base keeps the real
    hidden/dim_model_base ratio (4), so every scalar visibly changes the logits. The LongRoPE factors
    differ between short and long, so using the wrong list is caught.

    With `base` (a real config.json dict) every field of it is kept (sparse_config, eos ids, absent
    tie_word_embeddings, "type" vs "rope_type" ...) and only the sizes shrink: dim_model_base keeps
    base's ratio and the factor lists are resampled to head_dim/2 entries. `tied` and `longrope`
    are then ignored: tying and rope_scaling are what `base` says (edit the result to change them).
    """
    half = hidden // heads // 2
    sizes = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
             "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab}
    if base is not None:
        config = json.loads(json.dumps(base))  # deep copy
        ratio = base["hidden_size"] / base.get("dim_model_base", REMOTE_DEFAULTS["dim_model_base"])
        if "num_key_value_heads" not in base and kv_heads == heads:
            del sizes["num_key_value_heads"]  # absent means MHA: keep it absent
        config.update(sizes)
        if "dim_model_base" in base:
            dim_model_base = hidden / ratio
            config["dim_model_base"] = int(dim_model_base) if dim_model_base == int(dim_model_base) else dim_model_base
        if "head_dim" in base:
            config["head_dim"] = hidden // heads
        scaling = config.get("rope_scaling")
        if scaling and "short_factor" in scaling:
            scaling["short_factor"] = _resample(scaling["short_factor"], half)
            scaling["long_factor"] = _resample(scaling["long_factor"], half)
        return config

    steps = [i / max(1, half - 1) for i in range(half)]
    rope_scaling = {
        "rope_type": "longrope",
        "long_factor": [round(1.0 + 15.0 * s * s, 6) for s in steps],  # 1 -> 16
        "short_factor": [round(8.0 ** s, 6) for s in steps],  # 1 -> 8
        "original_max_position_embeddings": MAX_POSITIONS,
    }
    return {
        "architectures": ["MiniCPMForCausalLM"],
        "auto_map": dict(AUTO_MAP),
        "model_type": "minicpm",
        "bos_token_id": 1,
        "eos_token_id": [2, vocab - 1],
        "hidden_act": "silu",
        "initializer_range": 0.1,
        **sizes,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling if longrope else None,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.3",
        "use_cache": True,
        "scale_emb": 12,
        "dim_model_base": hidden // 4,
        "scale_depth": 1.4,
    }


def _resample(values, count):
    """`count` entries spread over `values` (first and last kept), so a real curve keeps its shape."""
    if len(values) == count:
        return list(values)
    if count == 1:
        return [values[0]]
    return [values[round(i * (len(values) - 1) / (count - 1))] for i in range(count)]


def is_tied(config):
    """tie_word_embeddings, with the remote config's default (True) when absent."""
    return bool(config.get("tie_word_embeddings", REMOTE_DEFAULTS["tie_word_embeddings"]))


def scalar(config, name):
    """A muP scalar; absent ones take the remote default, as remote code would (minicpm.md, section 1)."""
    return config.get(name, REMOTE_DEFAULTS[name])


def head_dim(config):
    """hidden/heads: MiniCPM-1/2/4 derive it (their configs carry no head_dim)."""
    return config["hidden_size"] // config["num_attention_heads"]


def rope_kind(config):
    """None, "longrope", "dynamic", ...: MiniCPM4 writes "rope_type", MiniCPM3 "type"."""
    scaling = config.get("rope_scaling")
    if not scaling:
        return None
    return scaling.get("rope_type", scaling.get("type"))


def longrope_choice(config):
    """(factors, cos/sin multiplier) that MiniCPM's LongRoPE uses, or None without LongRoPE.

    The remote code builds its cos/sin cache once, at max_position_embeddings, so the choice is static:
    long factors only when max_position_embeddings > original_max_position_embeddings. Its multiplier
    sqrt(1 + ln(max/orig) / ln(orig)) is applied unconditionally, so it is 1 at max == orig and below 1
    when max < orig (the remote code does not clamp it; transformers' own longrope does).
    """
    if rope_kind(config) != "longrope":
        return None
    scaling = config["rope_scaling"]
    original = scaling["original_max_position_embeddings"]
    maximum = config["max_position_embeddings"]
    factors = scaling["long_factor"] if maximum > original else scaling["short_factor"]
    if len(factors) != head_dim(config) // 2:
        raise ValueError(f"LongRoPE factors have {len(factors)} entries, head_dim/2 is {head_dim(config) // 2}")
    return list(factors), math.sqrt(1 + math.log(maximum / original) / math.log(original))


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def make_minicpm_folder(folder, config, *, seed=0, dtype=torch.bfloat16, with_lm_head=None):
    """Write config.json and model.safetensors of a seeded random MiniCPM; returns the state dict saved.

    Norm weights are 1 + 0.3*noise and everything else 0.05*noise, so a swapped, transposed or
    mis-split tensor changes the logits. `with_lm_head` defaults to "untied": a tied model saved with
    lm_head.weight gets a copy of the embedding, an untied one without it is malformed on purpose.
    """
    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    dim = head_dim(config)

    def weight(*shape):
        return 0.05 * torch.randn(shape, generator=generator)

    def norm():
        return 1.0 + 0.3 * torch.randn(hidden, generator=generator)

    state = {"model.embed_tokens.weight": weight(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        state[prefix + "input_layernorm.weight"] = norm()
        state[prefix + "self_attn.q_proj.weight"] = weight(heads * dim, hidden)
        state[prefix + "self_attn.k_proj.weight"] = weight(kv_heads * dim, hidden)
        state[prefix + "self_attn.v_proj.weight"] = weight(kv_heads * dim, hidden)
        state[prefix + "self_attn.o_proj.weight"] = weight(hidden, heads * dim)
        state[prefix + "post_attention_layernorm.weight"] = norm()
        if config.get("num_experts"):  # MiniCPM-MoE: a router and w1 (gate), w3 (up), w2 (down) per expert
            state[prefix + "mlp.gate.weight"] = weight(config["num_experts"], hidden)
            for e in range(config["num_experts"]):
                state[prefix + f"mlp.experts.{e}.w1.weight"] = weight(inter, hidden)
                state[prefix + f"mlp.experts.{e}.w3.weight"] = weight(inter, hidden)
                state[prefix + f"mlp.experts.{e}.w2.weight"] = weight(hidden, inter)
            continue
        state[prefix + "mlp.gate_proj.weight"] = weight(inter, hidden)
        state[prefix + "mlp.up_proj.weight"] = weight(inter, hidden)
        state[prefix + "mlp.down_proj.weight"] = weight(hidden, inter)
    state["model.norm.weight"] = norm()
    lm_head = weight(config["vocab_size"], hidden)  # drawn always, so the other tensors do not depend on tying
    if with_lm_head is None:
        with_lm_head = not is_tied(config)
    if with_lm_head:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone() if is_tied(config) else lm_head

    state = {name: tensor.to(dtype).contiguous() for name, tensor in state.items()}
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    if "auto_map" in config:  # a MiniCPM folder ships the remote code its auto_map names
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(os.path.join(REMOTE_CODE, name), os.path.join(folder, name))
    return state


# --------------------------------------------------------------------------------------------
# Forward, from the formulas
# --------------------------------------------------------------------------------------------


def minicpm_logits(state_dict, config, tokens):
    """Float32 logits [batch, seq, vocab] of MiniCPM, in plain torch.

    h0 = embed(ids) * scale_emb; each branch output is multiplied by scale_depth / sqrt(layers) before
    the residual add; logits = lm_head(norm(h) / (hidden_size / dim_model_base)). lm_head is the
    embedding when the config says tied or lm_head.weight is absent.
    """
    w = {name: tensor.float() for name, tensor in state_dict.items()}
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    batch, seq = tokens.shape
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    dim, eps = head_dim(config), config["rms_norm_eps"]
    depth = scalar(config, "scale_depth") / math.sqrt(config["num_hidden_layers"])
    cos, sin = _rope_cos_sin(config, seq)
    causal = torch.triu(torch.full((seq, seq), float("-inf")), 1)

    def split_heads(x, count):
        return x.view(batch, seq, count, dim).transpose(1, 2)  # [b, heads, s, d]

    with torch.no_grad():
        h = w["model.embed_tokens.weight"][tokens] * scalar(config, "scale_emb")
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
            q = split_heads(x @ w[p + "self_attn.q_proj.weight"].T, heads)
            k = split_heads(x @ w[p + "self_attn.k_proj.weight"].T, kv_heads)
            v = split_heads(x @ w[p + "self_attn.v_proj.weight"].T, kv_heads)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim) + causal, dim=-1)
            attn = (scores @ v).transpose(1, 2).reshape(batch, seq, heads * dim)
            h = h + (attn @ w[p + "self_attn.o_proj.weight"].T) * depth
            x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
            h = h + (_moe(x, w, p, config) if config.get("num_experts") else _swiglu(x, w, p + "mlp.", "gate_proj",
                                                                                      "up_proj", "down_proj")) * depth
        h = _rms_norm(h, w["model.norm.weight"], eps)
        untied = not is_tied(config) and "lm_head.weight" in w
        head = w["lm_head.weight"] if untied else w["model.embed_tokens.weight"]
        return (h / (config["hidden_size"] / scalar(config, "dim_model_base"))) @ head.T


def _swiglu(x, w, prefix, gate, up, down):
    return (torch.nn.functional.silu(x @ w[f"{prefix}{gate}.weight"].T) * (x @ w[f"{prefix}{up}.weight"].T)) \
        @ w[f"{prefix}{down}.weight"].T


def _moe(x, w, prefix, config):
    """MiniCPM-MoE's MLP (vLLM's MiniCPMMoE): softmax router, top-k experts, weights renormalised."""
    probs = torch.softmax(x @ w[prefix + "mlp.gate.weight"].T, dim=-1)
    top, chosen = probs.topk(config["num_experts_per_tok"], dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(config["num_experts"]):
        weight = (top * (chosen == e)).sum(dim=-1, keepdim=True)  # 0 where expert e is not chosen
        out = out + weight * _swiglu(x, w, f"{prefix}mlp.experts.{e}.", "w1", "w3", "w2")
    return out


def _rms_norm(x, weight, eps):
    """Llama-style RMSNorm: x * rsqrt(mean(x^2) + eps) * w (fp32 throughout here)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x):
    """The non-interleaved RoPE pairing (i, i + d/2) that MiniCPM and Llama use."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rope_cos_sin(config, seq):
    """cos, sin [seq, head_dim] for positions 0..seq-1, as MiniCPM's rotary classes build them."""
    dim = head_dim(config)
    theta = config.get("rope_theta", REMOTE_DEFAULTS["rope_theta"])
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    positions = torch.arange(seq, dtype=torch.float32)
    kind, multiplier = rope_kind(config), 1.0
    if kind == "longrope":
        factors, multiplier = longrope_choice(config)
        freqs = torch.outer(positions, 1.0 / torch.tensor(factors, dtype=torch.float32)) * inv_freq
    elif kind is None or (kind == "dynamic" and seq <= config["max_position_embeddings"]):
        freqs = torch.outer(positions, inv_freq)  # dynamic NTK only rescales beyond max positions
    else:
        raise NotImplementedError(f"rope_scaling {config['rope_scaling']!r} at length {seq}")
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * multiplier, emb.sin() * multiplier


# --------------------------------------------------------------------------------------------
# Cross-check: transformers' Llama with the scalars folded into the weights
# --------------------------------------------------------------------------------------------


def llama_with_folded_scalars(state_dict, config):
    """An eval float32 transformers.LlamaForCausalLM computing the same logits as `minicpm_logits`.

    Folding: embedding x scale_emb, o_proj and down_proj x scale_depth/sqrt(layers), lm_head /
    (hidden/dim_model_base); the model is always untied (a tied lm_head is the unscaled embedding).

    LongRoPE: transformers 5.24 (`_compute_longrope_parameters` and `dynamic_rope_update`) picks the
    factor list per call, long when position_ids.max()+1 > original_max_position_embeddings, and
    multiplies cos/sin by `attention_factor`, which defaults to sqrt(1 + ln(f)/ln(orig)) with
    f = max_position_embeddings/original, clamped to 1 when f <= 1. MiniCPM instead chooses once from
    max_position_embeddings and never clamps. So both lists are set to MiniCPM's choice (the per-call
    switch then has nothing to switch) and `attention_factor` is set explicitly to MiniCPM's multiplier.
    """
    import transformers

    w = {name: tensor.float() for name, tensor in state_dict.items()}
    depth = scalar(config, "scale_depth") / math.sqrt(config["num_hidden_layers"])
    divisor = config["hidden_size"] / scalar(config, "dim_model_base")
    untied = not is_tied(config) and "lm_head.weight" in w
    folded = {name: tensor for name, tensor in w.items() if name != "lm_head.weight"}
    folded["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] * scalar(config, "scale_emb")
    folded["lm_head.weight"] = (w["lm_head.weight"] if untied else w["model.embed_tokens.weight"]) / divisor
    for name in w:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            folded[name] = w[name] * depth

    rope = {"rope_type": "default", "rope_theta": config.get("rope_theta", REMOTE_DEFAULTS["rope_theta"])}
    if rope_kind(config) == "longrope":
        factors, multiplier = longrope_choice(config)
        rope.update(rope_type="longrope", short_factor=factors, long_factor=factors, attention_factor=multiplier,
                    original_max_position_embeddings=config["rope_scaling"]["original_max_position_embeddings"])
    elif rope_kind(config) not in (None, "dynamic"):
        raise NotImplementedError(f"rope_scaling {config['rope_scaling']!r}")
    llama_config = transformers.LlamaConfig(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["rms_norm_eps"],
        hidden_act="silu",
        tie_word_embeddings=False,
        rope_parameters=rope,
    )
    llama_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(llama_config).float().eval()
    model.load_state_dict(folded, strict=True)
    return model


# --------------------------------------------------------------------------------------------
# The same model as a Megatron-LM per-rank torch checkpoint, written by hand
# --------------------------------------------------------------------------------------------


def minicpm_megatron_args(config, *, tp=1, make_vocab_size_divisible_by=128, dtype=torch.float32):
    """Megatron-LM args for `config`, with MiniCPM's multipliers under MindSpeed-LLM's argument names
    (scale_emb, scale_depth, dim_model_base, rope_scaling_type, long_factor, short_factor,
    rope_scaling_original_max_position_embeddings), which mcore_harness applies."""
    import mcore_harness

    heads = config["num_attention_heads"]
    extra = {}
    scaling = config.get("rope_scaling")
    if rope_kind(config) == "longrope":
        extra = {"rope_scaling_type": "longrope", "long_factor": list(scaling["long_factor"]),
                 "short_factor": list(scaling["short_factor"]),
                 "rope_scaling_original_max_position_embeddings": scaling["original_max_position_embeddings"]}
    elif rope_kind(config) not in (None, "dynamic"):
        raise NotImplementedError(f"rope_scaling {scaling!r}")
    return mcore_harness.megatron_args(
        tp=tp,
        num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        max_position_embeddings=config["max_position_embeddings"],
        norm_epsilon=config["rms_norm_eps"],
        rotary_base=config.get("rope_theta", REMOTE_DEFAULTS["rope_theta"]),
        untie_embeddings_and_output_weights=not is_tied(config),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        scale_emb=scalar(config, "scale_emb"),
        scale_depth=scalar(config, "scale_depth"),
        dim_model_base=scalar(config, "dim_model_base"),
        **extra,
    )


def save_minicpm_mcore_checkpoint(save_dir, state_dict, config, *, tp=1, make_vocab_size_divisible_by=128,
                                  iteration=1):
    """Write `state_dict` (HF names) as Megatron-LM `--ckpt-format torch` files for megatron-core's local
    spec: QKV grouped per query group [q heads; k; v], fc1 = [gate; up] per TP rank, vocab padded
    with zero rows. Returns the iteration directory."""
    import mcore_harness

    dtype = state_dict["model.embed_tokens.weight"].dtype
    args = minicpm_megatron_args(config, tp=tp, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                 dtype=dtype)
    heads, groups, dim = args.num_attention_heads, args.num_query_groups, args.kv_channels

    def padded(weight):
        rows = torch.zeros(args.padded_vocab_size, weight.shape[1], dtype=weight.dtype)
        rows[: weight.shape[0]] = weight
        return rows

    def qkv(hf):
        q = state_dict[hf + "self_attn.q_proj.weight"].view(groups, heads // groups * dim, -1)
        k = state_dict[hf + "self_attn.k_proj.weight"].view(groups, dim, -1)
        v = state_dict[hf + "self_attn.v_proj.weight"].view(groups, dim, -1)
        return torch.cat((q, k, v), dim=1).reshape(-1, q.shape[-1])

    iter_dir = os.path.join(os.fspath(save_dir), f"iter_{iteration:07d}")
    for rank in range(tp):
        def column(weight):  # column and vocab parallel: output rows split (whole query groups for QKV)
            return weight.chunk(tp, dim=0)[rank].clone()

        def row(weight):  # row parallel: input columns split
            return weight.chunk(tp, dim=1)[rank].clone()

        model = {"embedding.word_embeddings.weight": column(padded(state_dict["model.embed_tokens.weight"]))}
        for i in range(config["num_hidden_layers"]):
            hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
            fc1 = torch.cat((column(state_dict[hf + "mlp.gate_proj.weight"]),
                             column(state_dict[hf + "mlp.up_proj.weight"])))
            model.update({
                mc + "input_layernorm.weight": state_dict[hf + "input_layernorm.weight"].clone(),
                mc + "self_attention.linear_qkv.weight": column(qkv(hf)),
                mc + "self_attention.linear_qkv._extra_state": None,
                mc + "self_attention.linear_proj.weight": row(state_dict[hf + "self_attn.o_proj.weight"]),
                mc + "self_attention.linear_proj._extra_state": None,
                mc + "pre_mlp_layernorm.weight": state_dict[hf + "post_attention_layernorm.weight"].clone(),
                mc + "mlp.linear_fc1.weight": fc1,
                mc + "mlp.linear_fc1._extra_state": None,
                mc + "mlp.linear_fc2.weight": row(state_dict[hf + "mlp.down_proj.weight"]),
                mc + "mlp.linear_fc2._extra_state": None,
            })
        model["decoder.final_layernorm.weight"] = state_dict["model.norm.weight"].clone()
        if args.untie_embeddings_and_output_weights:
            model["output_layer.weight"] = column(padded(state_dict["lm_head.weight"]))
        model["output_layer._extra_state"] = None
        checkpoint = {"args": argparse.Namespace(**vars(args)), "checkpoint_version": 3.0, "iteration": iteration,
                      "model": model, "num_floating_point_operations_so_far": 0}
        path = mcore_harness.rank_file(iter_dir, rank, 0, 1)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)
    with open(os.path.join(os.fspath(save_dir), mcore_harness.TRACKER_FILE), "w") as tracker:
        tracker.write(str(iteration))
    return iter_dir
