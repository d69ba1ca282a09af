"""Megatron-Core as the independent truth for converter tests.

A converted checkpoint is only right if the real target software loads it strictly and gives
the source's logits. This module runs a real megatron-core GPTModel on the CPU (the patches are
in DESIGN.md, "Testing against real implementations") to

* compute logits from a Megatron-LM per-rank torch checkpoint (`mcore_logits`), and
* write such a checkpoint from a seeded random model, with that model's own logits
  (`save_mcore_checkpoint`).

The model is the one Megatron-LM's own `core_transformer_config_from_args` would build from the
args (`model_choices`): RMSNorm or LayerNorm, SwiGLU, non-gated GELU (tanh-approximate when
megatron-core fuses it with the fc1 bias), or squared ReLU, with or without linear biases; what
it cannot build raises NotImplementedError (see docs/research/megatron-activations.md).

Args carrying MiniCPM's muP multipliers (MindSpeed-LLM's names: scale_emb, scale_depth,
dim_model_base, rope_scaling_type="longrope" with long_factor/short_factor/
rope_scaling_original_max_position_embeddings) make both run MiniCPM's forward
(`apply_minicpm_multipliers`); args without them run exactly as before.

It must never import converter_core: the converter is judged against this module, not against
itself. Megatron only ever runs in child processes (one per tensor-parallel rank), so its global
parallel state never leaks into the pytest process.
"""

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import re
import signal
import socket
import tempfile
import time
import warnings
import zlib

import torch
import torch.multiprocessing as mp

CHECKPOINT_FILE = "model_optim_rng.pt"
# The args Namespace Megatron-LM's own parse_args returns today (see its README).
MEGATRON_LM_ARGS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "megatron-lm-args",
                                     "pretrain_gpt_args.pt")
TRACKER_FILE = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
DEFAULT_TIMEOUT = 300.0

# Weights of the random model: big enough that attention is far from uniform and a transposed,
# swapped or mis-split tensor visibly changes the logits.
INIT_STD = 0.05
NORM_LOW, NORM_HIGH = 0.5, 1.5

# --------------------------------------------------------------------------------------------
# Key names: TransformerEngine spec <-> local spec
# --------------------------------------------------------------------------------------------

# Per-layer names (after "decoder.layers.<i>.") that differ between the two specs.
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    # LayerNorm only: TE's LayerNormLinear keeps the norm's bias beside its weight
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}

# Modules with an `_extra_state` entry: the local linears save None, TE modules save a tensor.
LOCAL_EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)
# Multi-latent attention: its own linears; TE fuses the latent norms into the up projections and keeps
# input_layernorm separate.
MLA_EXTRA_STATE_MODULES = tuple(f"self_attention.linear_{name}" for name in ("q_proj", "q_down_proj", "q_up_proj",
                                                                             "kv_down_proj", "kv_up_proj"))
MLA_LOCAL_TO_TE = {
    "self_attention.q_layernorm.weight": "self_attention.linear_q_up_proj.layer_norm_weight",
    "self_attention.kv_layernorm.weight": "self_attention.linear_kv_up_proj.layer_norm_weight",
}
TE_TO_LOCAL.update({te: local for local, te in MLA_LOCAL_TO_TE.items()})
LOCAL_EXTRA_STATE_MODULES += MLA_EXTRA_STATE_MODULES
TE_EXTRA_STATE_MODULES = LOCAL_EXTRA_STATE_MODULES + ("self_attention.core_attention",)

EXTRA_STATE = "._extra_state"
LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")


# The tiny model both harness self-tests use.
TINY_ARGS = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=96,
    make_vocab_size_divisible_by=64,  # 96 pads to 128 at TP 1 and at TP 2
)
TINY_TOKENS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))


def local_to_te_state_dict(state, grouped=False):
    """Rename a local-spec state dict the way a TransformerEngine-spec model would save it. MoE layers
    keep a separate pre_mlp_layernorm; their experts are SequentialMLP's TE linears, or with `grouped`
    TEGroupedMLP's (linear_fc1.weight{j} and, with biases, linear_fc1.bias{j}; one extra state per
    GroupedLinear)."""
    out = {}
    layers = set()
    moe = {key[: -len("mlp.router.weight")] for key in state if key.endswith(".mlp.router.weight")}
    mla = {key[: -len("self_attention.linear_kv_down_proj.weight")] for key in state
           if key.endswith(".self_attention.linear_kv_down_proj.weight")}
    expert = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias|_extra_state)")
    for key, value in state.items():
        match = LAYER_KEY.fullmatch(key)
        if match:
            prefix, rest = f"decoder.layers.{match.group(1)}.", match.group(2)
            layers.add(prefix)
            in_expert = expert.fullmatch(rest)
            if prefix in moe and rest.startswith("pre_mlp_layernorm.") or prefix in mla and rest.startswith("input_layernorm."):
                pass
            elif prefix in mla and rest in MLA_LOCAL_TO_TE:
                key = prefix + MLA_LOCAL_TO_TE[rest]
            elif in_expert and grouped:
                if in_expert.group(3) == "_extra_state":
                    out[f"{prefix}mlp.experts.{in_expert.group(2)}{EXTRA_STATE}"] = _te_extra_state()
                    continue
                key = f"{prefix}mlp.experts.{in_expert.group(2)}.{in_expert.group(3)}{in_expert.group(1)}"
            elif in_expert or re.fullmatch(r"mlp\.shared_experts\.linear_fc[12]\._extra_state", rest):
                value = _te_extra_state() if rest.endswith(EXTRA_STATE) else value
            elif rest in LOCAL_TO_TE:
                key = prefix + LOCAL_TO_TE[rest]
            elif rest.endswith(EXTRA_STATE) and rest[: -len(EXTRA_STATE)] in TE_EXTRA_STATE_MODULES:
                value = _te_extra_state()
        out[key] = value
    for prefix in sorted(layers):
        out[prefix + "self_attention.core_attention" + EXTRA_STATE] = _te_extra_state()
    return out


def te_to_local_state_dict(state):
    """Map TransformerEngine names to local names; any key not in the table passes unchanged."""
    out = {}
    for key, value in state.items():
        match = LAYER_KEY.fullmatch(key)
        if match:
            prefix, rest = f"decoder.layers.{match.group(1)}.", match.group(2)
            module = rest[: -len(EXTRA_STATE)] if rest.endswith(EXTRA_STATE) else None
            grouped = re.fullmatch(r"mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)", rest)  # TEGroupedMLP
            if rest in TE_TO_LOCAL:
                key = prefix + TE_TO_LOCAL[rest]
            elif grouped:
                expert = f"{prefix}mlp.experts.local_experts.{grouped.group(3)}.{grouped.group(1)}"
                key, out[expert + EXTRA_STATE] = f"{expert}.{grouped.group(2)}", None
            elif module and re.fullmatch(r"mlp\.experts\.linear_fc[12]", module):
                continue  # one extra state per GroupedLinear; the local experts have theirs (above)
            elif module and re.fullmatch(r"mlp\.(experts\.local_experts\.\d+|shared_experts)\.linear_fc[12]", module):
                value = None  # TE linears of SequentialMLP experts; the local ones save None
            elif module in LOCAL_EXTRA_STATE_MODULES:
                value = None
            elif module in TE_EXTRA_STATE_MODULES:
                continue  # core_attention: the local model has no such entry
        out[key] = value
    return out


def _te_extra_state():
    """What TE (recent versions) stores for a module without FP8 metadata."""
    return torch.empty(0, dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Checkpoint folder layout (pure file system: safe to call in the pytest process)
# --------------------------------------------------------------------------------------------


def checkpoint_layout(iter_dir, ep=1):
    """Return (tp, pp) read from the mp_rank_* folders, which must form a complete grid.

    PP == 1 must use 'mp_rank_TT' and PP > 1 'mp_rank_TT_PPP', as Megatron-LM names them; with `ep` > 1
    (the folder names alone cannot tell it from PP) each ends in '_EEE' for EP ranks 0 .. ep - 1. With
    expert TP 1 Megatron-LM writes only the files of ranks r < max(tp, ep), TP rank r % tp and EP rank
    r % ep, so only TP rank t's (t, t % ep) and EP rank e's (e % tp, e) must be there; a rank that reads
    another file finds it missing then.
    """
    names = sorted(n for n in os.listdir(iter_dir) if n.startswith("mp_rank_"))
    if not names:
        raise FileNotFoundError(f"{iter_dir}: no mp_rank_* folders")
    if ep > 1:
        endings = {name[-4:] for name in names}
        if endings != {f"_{e:03d}" for e in range(ep)}:
            raise ValueError(f"{iter_dir}: rank folders {names} do not end in the EP ranks of EP {ep}")
        names = sorted({name[:-4] for name in names})
    ranks = set()
    for name in names:
        match = RANK_DIR.fullmatch(name)
        if not match:
            raise ValueError(f"{iter_dir}: unsupported rank folder {name!r}")
        ranks.add((int(match.group(1)), None if match.group(2) is None else int(match.group(2))))
    with_pp = {pp is not None for _, pp in ranks}
    if len(with_pp) != 1:
        raise ValueError(f"{iter_dir}: mixes folders with and without a pipeline rank: {names}")
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1 if with_pp == {True} else 1
    if with_pp == {True} and pp == 1:
        raise ValueError(f"{iter_dir}: PP == 1 checkpoints are named mp_rank_TT, got {names}")
    expected = {(t, p if pp > 1 else None) for t in range(tp) for p in range(pp)}
    if ranks != expected:
        raise ValueError(f"{iter_dir}: rank folders {names} do not form a {tp}x{pp} grid")
    for t, p in expected:
        for e in range(ep):
            path = rank_file(iter_dir, t, p or 0, pp, e, ep)
            if (e == t % ep or t == e % tp) and not os.path.isfile(path):
                raise FileNotFoundError(path)
    return tp, pp


def rank_file(iter_dir, tp_rank, pp_rank, pp, ep_rank=0, ep=1):
    """Megatron-LM's file name for one (tp, pp[, ep]) rank."""
    folder = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    folder += f"_{ep_rank:03d}" if ep > 1 else ""
    return os.path.join(iter_dir, folder, CHECKPOINT_FILE)


def padded_vocab_size(vocab_size, make_vocab_size_divisible_by, tp):
    """Megatron's vocab padding: a multiple of make_vocab_size_divisible_by * tp."""
    multiple = make_vocab_size_divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def mcore_logits(iter_dir, tokens, te_names=False, timeout=DEFAULT_TIMEOUT, mtp=False, ep=1):
    """Float32 logits [batch, seq, padded_vocab] of the checkpoint in `iter_dir`, by megatron-core.

    Every rank file is loaded strictly: a missing or unexpected key (including `_extra_state`
    entries, which megatron-core's own load hook would otherwise fill in) raises.
    `te_names=True` reads files written with TransformerEngine names. MiniCPM multipliers found in
    the args are applied (`apply_minicpm_multipliers`). With `mtp=True` (a model with mtp_num_layers)
    it returns (logits, mtp_logits), the latter [depths, batch, seq, padded_vocab]: what megatron-core's
    multi-token-prediction layers predict (the token after next, for depth 1). `ep`: the checkpoint's
    expert-parallel size, run as it is (one process per TP x EP rank, each given the same tokens).
    """
    iter_dir = os.path.abspath(iter_dir)  # the rank processes do not share our working directory
    tp, pp = checkpoint_layout(iter_dir, ep)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    return _run_ranks(_logits_worker, tp * ep, (iter_dir, pp, tokens, te_names, mtp, ep), timeout)


def megatron_args(*, tp=1, iteration=1, te_names=False, base=None, **overrides):
    """A Megatron-LM style argparse.Namespace for a tiny Llama-like GPT model.

    Names are Megatron-LM's argument names; `overrides` may set any of them (or add others).
    Values derived from others (padded_vocab_size, kv_channels, group_query_attention, ...)
    follow the overrides unless overridden themselves. With `base` (a Namespace such as the one
    Megatron-LM itself writes), every field of `base` is kept except the model's, which are set as
    here; the norm epsilon then goes under whichever name `base` uses.
    """
    for fixed in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "iteration"):
        if fixed in overrides:
            raise ValueError(f"{fixed} is set by the harness, not by an override")
    values = {
        "num_layers": 2,
        "hidden_size": 64,
        "ffn_hidden_size": 128,
        "num_attention_heads": 4,
        "num_query_groups": None,
        "max_position_embeddings": 128,
        "position_embedding_type": "rope",
        "add_position_embedding": False,
        "use_rotary_position_embeddings": False,
        "rotary_base": 10000,
        "rotary_percent": 1.0,
        "rotary_interleaved": False,
        "rotary_seq_len_interpolation_factor": None,
        "use_rope_scaling": False,
        "rope_scaling_factor": 8.0,
        "normalization": "RMSNorm",
        "norm_epsilon": 1e-5,
        "apply_layernorm_1p": False,
        "swiglu": True,
        "squared_relu": False,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "untie_embeddings_and_output_weights": True,
        "apply_query_key_layer_scaling": False,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "vocab_size": 96,
        "make_vocab_size_divisible_by": 128,
        "tokenizer_type": "HuggingFaceTokenizer",
        "tokenizer_model": None,
        "vocab_file": None,
        "merge_file": None,
        "num_experts": None,
        "moe_ffn_hidden_size": None,
        "mtp_num_layers": None,
        "spec": None,
        "params_dtype": torch.float32,
        "fp16": False,
        "bf16": False,
        "sequence_parallel": False,
        "virtual_pipeline_model_parallel_size": None,
        "num_layers_per_virtual_pipeline_stage": None,
        "expert_model_parallel_size": 1,
        "context_parallel_size": 1,
        "data_parallel_size": 1,
        "use_cpu_initialization": True,
        "init_method_std": INIT_STD,
        "use_legacy_models": False,
        "ckpt_format": "torch",
        "consumed_train_samples": 0,
        "consumed_valid_samples": 0,
        "no_save_optim": True,
        "no_save_rng": True,
    }
    if base is not None:
        epsilon_name = "layernorm_epsilon" if hasattr(base, "layernorm_epsilon") else "norm_epsilon"
        values[epsilon_name] = values.pop("norm_epsilon")
        values = {**vars(base), **values}
    values.update(overrides)
    derived = {
        "group_query_attention": values["num_query_groups"] not in (None, values["num_attention_heads"]),
        "kv_channels": values["hidden_size"] // values["num_attention_heads"],
        "seq_length": values["max_position_embeddings"],
        "padded_vocab_size": padded_vocab_size(
            values["vocab_size"], values["make_vocab_size_divisible_by"], tp
        ),
        "transformer_impl": "transformer_engine" if te_names else "local",
        "world_size": tp,
        # Megatron-LM's validate_args: no bias, no bias-gelu fusion; a bias on every linear includes QKV.
        "bias_gelu_fusion": values.get("bias_gelu_fusion", True) and values["add_bias_linear"],
        "add_qkv_bias": values["add_qkv_bias"] or values["add_bias_linear"],
    }
    values.update({k: v for k, v in derived.items() if k not in overrides})
    if values["num_query_groups"] is None:
        values["num_query_groups"] = 1  # Megatron-LM's default when GQA is off
    values.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, iteration=iteration)
    return argparse.Namespace(**values)


def save_mcore_checkpoint(
    save_dir,
    *,
    tokens,
    tp=1,
    seed=0,
    te_names=False,
    iteration=1,
    timeout=DEFAULT_TIMEOUT,
    init_std=INIT_STD,
    **args_overrides,
):
    """Save a seeded random megatron-core GPTModel as Megatron-LM's `--ckpt-format torch` would.

    Writes `<save_dir>/iter_{iteration:07d}/mp_rank_{tp:02d}/model_optim_rng.pt` for every TP
    rank (PP == 1 only), then the tracker file. Returns (iteration_dir, logits), where logits
    are what megatron-core computes for `tokens` with that same model before saving: the
    reference a converted checkpoint must reproduce. `args_overrides` are Megatron-LM argument
    names (see `megatron_args`). `init_std` is the standard deviation of the random matrices and
    biases. A model the harness cannot build raises NotImplementedError here, before any process starts.
    """
    args = megatron_args(tp=tp, iteration=iteration, te_names=te_names, **args_overrides)
    model_choices(args)
    save_dir = os.path.abspath(save_dir)  # the rank processes do not share our working directory
    iter_dir = os.path.join(save_dir, f"iter_{iteration:07d}")
    if os.path.exists(iter_dir):
        raise FileExistsError(f"{iter_dir} exists; stale rank files would mix with new ones")
    os.makedirs(iter_dir)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    logits = _run_ranks(_save_worker, tp, (iter_dir, args, seed, te_names, tokens, init_std), timeout)
    with open(os.path.join(save_dir, TRACKER_FILE), "w") as tracker:
        tracker.write(str(iteration))
    return iter_dir, logits


# --------------------------------------------------------------------------------------------
# Process management (parent side)
# --------------------------------------------------------------------------------------------


def _run_ranks(worker, nprocs, worker_args, timeout):
    """Run `worker(rank, nprocs, port, out_path, *worker_args)` in `nprocs` fresh processes.

    Returns the tensor rank 0 saved at out_path. A failing child raises here with its
    traceback; a child that hangs is killed after `timeout` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="mcore_harness_") as tmp:
        out_path = os.path.join(tmp, "rank0_logits.pt")
        context = mp.start_processes(
            worker,
            args=(nprocs, _free_port(), out_path) + tuple(worker_args),
            nprocs=nprocs,
            join=False,
            start_method="forkserver",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"megatron-core children did not finish in {timeout:.0f} s")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
            last_line = str(error).strip().splitlines()[-1]
            raise RuntimeError(f"megatron-core child failed: {last_line}\n{error}") from None
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                    process.join(10)
        return torch.load(out_path, weights_only=True)


# Importing megatron-core takes seconds, and each check starts fresh rank processes. They are forked
# from one server process that imported it once (the first check starts it), so a check starts at once
# yet shares no state with the checks before it. Modules that fail to import are skipped by the server.
mp.set_forkserver_preload([
    "megatron.core.parallel_state", "megatron.core.tensor_parallel", "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs", "megatron.core.transformer.multi_latent_attention",
    "megatron.core.transformer.moe.moe_utils", "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
])


def _free_port():
    """A TCP port that was free a moment ago, for the gloo rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Child side: everything below runs in a rank process (forked from the server), where megatron may be imported
# --------------------------------------------------------------------------------------------


def _logits_worker(rank, world, port, out_path, iter_dir, pp, tokens, te_names, mtp=False, ep=1):
    """One TP x EP rank: build every PP stage locally, load its file strictly, chain the stages."""
    with _megatron_cpu(rank, world, port, ep):
        from megatron.core import parallel_state

        _experts_whole_on_every_tp_rank(_read_rank_file(rank_file(iter_dir, 0, 0, pp, 0, ep))["args"])
        tp, t, e = world // ep, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_expert_model_parallel_rank()
        stages, total_layers = [], 0
        for stage in range(pp):
            path = rank_file(iter_dir, t, stage, pp, e, ep)
            checkpoint = _read_rank_file(path)
            args = _checked_args(checkpoint, path, tp, pp, ep)
            if stage == 0:
                first_args = args
            state = checkpoint["model"]
            num_layers = _layer_count(state)
            model = _gpt_model(args, num_layers, pre_process=stage == 0, post_process=stage == pp - 1)
            _load_strictly(model, state, te_names, path, getattr(args, "moe_grouped_gemm", False))
            stages.append(model)
            total_layers += num_layers
        if total_layers != first_args.num_layers:
            raise ValueError(
                f"{iter_dir}: stages hold {total_layers} layers, args.num_layers is "
                f"{first_args.num_layers}"
            )
        mtp_logits = []
        logits = _forward(stages, tokens, mtp_logits)
        if mtp and not mtp_logits:
            raise ValueError(f"{iter_dir}: the model has no multi-token-prediction layers (mtp_num_layers)")
        if rank == 0:
            torch.save((logits, torch.stack(mtp_logits)) if mtp else logits, out_path)


def _save_worker(rank, tp, port, out_path, iter_dir, args, seed, te_names, tokens, init_std):
    """One TP rank: random model, its logits, then the rank file as Megatron-LM writes it."""
    with _megatron_cpu(rank, tp, port):
        model = _gpt_model(args, args.num_layers, pre_process=True, post_process=True)
        _randomize(model, seed, rank, init_std)
        logits = _forward([model], tokens)
        state = model.state_dict_for_save_checkpoint()
        if te_names:
            state = local_to_te_state_dict(state)
        checkpoint = {
            "args": args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": args.iteration,
            "model": state,
            "num_floating_point_operations_so_far": 0,
        }
        path = rank_file(iter_dir, rank, 0, 1)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(checkpoint, path)
        if rank == 0:
            torch.save(logits, out_path)


@contextlib.contextmanager
def _megatron_cpu(rank, world_size, port, ep=1):
    """Patch megatron-core for the CPU and set up a gloo group with TP = world_size / ep, PP = 1, EP = ep."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor. is deprecated")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT),
    )
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=world_size // ep, pipeline_model_parallel_size=1, expert_model_parallel_size=ep
    )
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    yield
    # Only on success: tearing the group down while a failed peer is gone can abort this
    # process (SIGABRT) before spawn records the real error.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def model_choices(args):
    """What megatron-core builds from these Megatron-LM args, as a dict of plain values:

    normalization ("RMSNorm" or "LayerNorm"), activation ("silu", "gelu" or "squared_relu": the
    TransformerConfig.activation_func), gated (gated_linear_unit) and bias_activation_fusion, chosen
    as Megatron-LM's core_transformer_config_from_args chooses them (0.16.1 and main alike):
    swiglu -> gated silu; squared_relu -> squared ReLU; otherwise F.gelu, the default. The fusion
    flag is bias_swiglu_fusion for SwiGLU and bias_gelu_fusion otherwise, the latter off without
    add_bias_linear (validate_args). It matters for GELU: megatron-core's fused bias-GELU is the tanh
    approximation, the unfused F.gelu is exact (erf). For SwiGLU the fused and unfused forms compute
    the same function, and the harness keeps it unfused. openai_gelu and onnx_safe are read by
    Megatron-LM's legacy models only; megatron-core models ignore them, and so does the harness.

    Raises NotImplementedError for what the harness cannot build on the CPU (naming the arg), and
    ValueError for args Megatron-LM itself refuses.
    """
    def refuse(name, why):
        raise NotImplementedError(f"harness cannot build {name}={getattr(args, name)!r}: {why}")

    if args.position_embedding_type not in ("rope", "yarn"):
        refuse("position_embedding_type", "rope and yarn only")
    if args.normalization not in ("RMSNorm", "LayerNorm"):
        refuse("normalization", "RMSNorm and LayerNorm only")
    for name in ("apply_layernorm_1p", "layernorm_zero_centered_gamma"):
        if getattr(args, name, False) and args.normalization != "RMSNorm":  # RMSNorm: ZeroCentredRMSNorm
            refuse(name, "zero-centered LayerNorm weights (w + 1) have no local-spec CPU norm in megatron-core 0.16.1")
    if getattr(args, "apply_residual_connection_post_layernorm", False):
        refuse("apply_residual_connection_post_layernorm", "pre-norm residuals only")
    if getattr(args, "use_te_activation_func", False):
        refuse("use_te_activation_func", "TransformerEngine's activation kernels are not on the CPU")
    swiglu, squared_relu = args.swiglu, getattr(args, "squared_relu", False)
    if getattr(args, "quick_geglu", False) and not swiglu:  # clamp and offset: gpt_oss_fields
        return dict(normalization=args.normalization, activation="quick_gelu", gated=True, bias_activation_fusion=False)
    if swiglu and squared_relu:
        raise ValueError("swiglu and squared_relu are both set; Megatron-LM asserts that at most one is")
    if swiglu:
        return dict(normalization=args.normalization, activation="silu", gated=True, bias_activation_fusion=False)
    fusion = bool(getattr(args, "bias_gelu_fusion", True) and args.add_bias_linear)
    if squared_relu and fusion:
        raise ValueError("squared_relu with add_bias_linear needs bias_gelu_fusion=False "
                         "(megatron-core fuses a bias with gelu or swiglu only, and its TransformerConfig refuses)")
    return dict(normalization=args.normalization, activation="squared_relu" if squared_relu else "gelu",
                gated=False, bias_activation_fusion=fusion)


def _activation_function(name):
    """The megatron-core function object for a `model_choices` activation name."""
    from megatron.core.activations import quick_gelu, squared_relu

    return {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "squared_relu": squared_relu,
            "quick_gelu": quick_gelu}[name]


def _gpt_model(args, num_layers, pre_process, post_process):
    """A local-spec GPTModel (one PP stage of `num_layers` layers) from Megatron-LM args."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.transformer_config import TransformerConfig

    choices = model_choices(args)
    experts = getattr(args, "num_experts", None)
    frequency = getattr(args, "moe_layer_freq", 1)
    if experts and num_layers != args.num_layers and frequency != 1:
        raise NotImplementedError("harness builds MoE models with dense layers in one pipeline stage only")
    routing = {name: getattr(args, name) for name in MOE_ROUTING_ARGS if getattr(args, name, None) is not None}
    moe = dict(num_moe_experts=experts, moe_router_topk=args.moe_router_topk, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
               moe_router_pre_softmax=getattr(args, "moe_router_pre_softmax", False), moe_layer_freq=frequency,
               moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
               moe_aux_loss_coeff=0.0, **routing) if experts else {}
    moe_utils.te_general_gemm = None  # megatron-core 0.16.1's router without TransformerEngine
    mla = getattr(args, "multi_latent_attention", False)
    config_class, mla_fields = TransformerConfig, {}
    mtp_layers = getattr(args, "mtp_num_layers", None)
    mtp_fields = {"mtp_num_layers": mtp_layers} if mtp_layers else {}
    if mla:
        from megatron.core.transformer import multi_latent_attention
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        multi_latent_attention.HAVE_TE = False
        config_class = MLATransformerConfig
        mla_fields = {field: getattr(args, name) for field, name in MLA_ARGS if getattr(args, name, None) is not None}
        mla_fields["q_lora_rank"] = args.q_lora_rank  # None: one query projection
        mla_fields.setdefault("rope_type", "yarn")  # Megatron-LM's default for MLA
        mla_fields["rotary_base"] = args.rotary_base

    config = config_class(
        num_layers=num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        ffn_hidden_size=args.ffn_hidden_size,
        normalization=choices["normalization"],
        layernorm_epsilon=norm_epsilon(args),
        gated_linear_unit=choices["gated"],
        activation_func=_activation_function(choices["activation"]),
        bias_activation_fusion=choices["bias_activation_fusion"],
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        qk_layernorm=getattr(args, "qk_layernorm", False),
        **moe,
        **mla_fields,
        **minicpm_config_overrides(args),
        **mtp_fields,
        **gpt_oss_fields(args),
        **hybrid_fields(args, num_layers),
    )
    yarn_settings(config, args)
    if experts or config.layernorm_zero_centered_gamma or config.experimental_attention_variant:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization)
        hybrid_layer_specs(spec, config)
    else:
        spec = get_gpt_layer_local_spec(normalization=config.normalization, qk_layernorm=config.qk_layernorm,
                                        multi_latent_attention=mla)
    if mla:  # the local core attention rejects MLA's different q/k and v head dims
        for layer in getattr(spec, "layer_specs", None) or [spec]:
            layer.submodules.self_attention.submodules.core_attention = _CausalSdpa
    mtp_spec = None
    if mtp_layers and post_process:  # megatron-core puts every MTP layer on the last pipeline stage
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        mtp_spec = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=False,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        mtp_block_spec=mtp_spec,
    )
    apply_minicpm_multipliers(model, args)
    return model.eval()


# Megatron-LM router args passed to TransformerConfig under the same names.
MOE_ROUTING_ARGS = ("moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_num_groups",
                    "moe_router_group_topk", "moe_router_topk_scaling_factor", "moe_shared_expert_intermediate_size",
                    "moe_router_dtype")
# (MLATransformerConfig field, Megatron-LM arg)
MLA_ARGS = (("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"), ("qk_head_dim", "qk_head_dim"),
            ("qk_pos_emb_head_dim", "qk_pos_emb_head_dim"), ("v_head_dim", "v_head_dim"), ("rope_type", "rope_type"),
            ("rotary_scaling_factor", "rotary_scaling_factor"), ("mscale", "mscale"),
            ("mscale_all_dim", "mscale_all_dim"), ("original_max_position_embeddings",
                                                  "yarn_original_max_position_embeddings"),
            ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"))


def gpt_oss_fields(args):
    """TransformerConfig fields for gpt-oss's parts, from Megatron-LM's args: attention sinks (softmax_type),
    sliding windows, the clamped GLU with offset, experts whole on every TP rank (expert_tensor_parallel_size
    1: megatron-core's MoE biases need it; the process group is re-made to match)."""
    from megatron.core.fusions import fused_softmax

    fields = {name: getattr(args, name) for name in ("softmax_type", "window_size", "window_attn_skip_freq",
                                                     "glu_linear_offset", "activation_func_clamp_value")
              if getattr(args, name, None) is not None}
    if fields.get("window_size") is not None:
        fields["window_size"] = tuple(fields["window_size"])
        fused_softmax.get_sliding_window_causal_mask = _cpu_sliding_window_mask
    if _experts_whole_on_every_tp_rank(args):
        fields["expert_tensor_parallel_size"] = 1
    return fields


def _experts_whole_on_every_tp_rank(args):
    """Whether the args keep experts whole (expert_tensor_parallel_size 1, as gpt-oss's do); if so, the
    process group is re-made with the same TP and EP and expert TP 1. megatron-core then numbers the ranks
    as Megatron-LM runs them (order tp-cp-ep-dp-pp): at TP 2 x EP 2 rank r is TP rank r % 2 and EP rank
    r % 2, so its files are mp_rank_00_000 and mp_rank_01_001, each loaded by the ranks that would
    load it in training (mp_rank_00_001 and mp_rank_01_000 are read by no Megatron-LM rank)."""
    from megatron.core import parallel_state

    if getattr(args, "expert_tensor_parallel_size", None) != 1 or not getattr(args, "num_experts", None):
        return False
    if parallel_state.get_expert_tensor_parallel_world_size() != 1:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        ep = parallel_state.get_expert_model_parallel_world_size()
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    return True


# Megatron-LM args of Gated DeltaNet hybrids, attention output gates, shared-expert gates and zero-centred
# norms, passed to TransformerConfig under the same names.
HYBRID_ARGS = ("experimental_attention_variant", "linear_attention_freq", "linear_conv_kernel_dim",
               "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads",
               "attention_output_gate", "moe_shared_expert_gate", "layernorm_zero_centered_gamma")


def hybrid_fields(args, num_layers):
    """TransformerConfig fields for Qwen3-Next's parts (see HYBRID_ARGS); apply_layernorm_1p is the older name
    of layernorm_zero_centered_gamma."""
    fields = {name: getattr(args, name) for name in HYBRID_ARGS if getattr(args, name, None) is not None}
    if getattr(args, "apply_layernorm_1p", False):
        fields["layernorm_zero_centered_gamma"] = True
    if isinstance(fields.get("linear_attention_freq"), tuple):
        fields["linear_attention_freq"] = list(fields["linear_attention_freq"])
    if fields.get("experimental_attention_variant") and num_layers != args.num_layers:
        raise NotImplementedError("harness builds linear-attention hybrids in one pipeline stage only")
    return fields


def hybrid_layer_specs(block, config):
    """Local-spec stand-ins for what megatron-core 0.16.1 runs only with TransformerEngine and fla (its
    experimental-attention block spec asserts TransformerEngine): Gated DeltaNet layers built from local
    linears (ColumnParallelLinear in_proj, RowParallelLinear out_proj) on the layers linear_attention_freq
    names, with fla's kernels replaced by weight-free torch code (megatron-core's own torch chunked gated-delta
    rule and an l2norm; its conv1d is torch's nn.Conv1d already when causal_conv1d is absent); with
    layernorm_zero_centered_gamma every norm becomes ZeroCentredRMSNorm (TENorm's zero_centered_gamma;
    the local norms refuse it). The parameter names are the local spec's: nothing is added or left out."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_linear_attention_pattern
    from megatron.core.ssm import gated_delta_net
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec

    zero_centred = config.layernorm_zero_centered_gamma
    if zero_centred and config.normalization != "RMSNorm":
        raise NotImplementedError("harness: zero-centred norms are RMSNorm only")
    linear = get_linear_attention_pattern(config) if config.experimental_attention_variant else [0] * config.num_layers
    if any(linear):
        if config.experimental_attention_variant != "gated_delta_net":
            raise NotImplementedError(f"harness: {config.experimental_attention_variant} is not built")
        gated_delta_net.HAVE_FLA = True
        gated_delta_net.l2norm = _l2norm
        gated_delta_net.chunk_gated_delta_rule = gated_delta_net.torch_chunk_gated_delta_rule
    block.layer_specs = [dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules))
                         for layer in block.layer_specs]  # the block shares one spec among layers of a kind
    for layer, is_linear in zip(block.layer_specs, linear):
        parts = layer.submodules
        if is_linear:
            parts.self_attention = ModuleSpec(module=gated_delta_net.GatedDeltaNet, submodules=gated_delta_net.
                                              GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear,
                                                                      out_norm=ZeroCentredRMSNorm if zero_centred
                                                                      else parts.input_layernorm,
                                                                      out_proj=RowParallelLinear))
        if zero_centred:
            parts.input_layernorm = parts.pre_mlp_layernorm = ZeroCentredRMSNorm
            if config.qk_layernorm and not is_linear:
                parts.self_attention = dataclasses.replace(parts.self_attention, submodules=dataclasses.replace(
                    parts.self_attention.submodules, q_layernorm=ZeroCentredRMSNorm, k_layernorm=ZeroCentredRMSNorm))
    if zero_centred:
        block.layer_norm = ZeroCentredRMSNorm


def _l2norm(x, dim=-1, eps=1e-6):
    """fla's l2norm: x / sqrt(sum(x^2) + eps) over the last dimension."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


class ZeroCentredRMSNorm(torch.nn.Module):
    """RMSNorm whose stored weight is the scale minus one, computed in float32 as TransformerEngine's
    RMSNorm with zero_centered_gamma: x / rms(x) * (1 + w)."""

    def __init__(self, config, hidden_size, eps=1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x):
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1 + self.weight.float())).to(x.dtype)


def _cpu_sliding_window_mask(sq, skv, window_size):
    """megatron-core's sliding-window mask (True: masked), built on the CPU: key j is seen from query i
    when i - window_size[0] <= j - (skv - sq) <= i + window_size[1]."""
    seen = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window_size[0]).tril(skv - sq + window_size[1])
    return ~seen


def yarn_settings(config, args):
    """GPTModel's YaRN embedding reads yarn_* attributes of the config (not TransformerConfig fields);
    Megatron-LM's args name them as for MLA."""
    if args.position_embedding_type != "yarn":
        return
    for field, name in (("yarn_rotary_scaling_factor", "rotary_scaling_factor"), ("yarn_mscale", "mscale"),
                        ("yarn_mscale_all_dim", "mscale_all_dim"), ("yarn_beta_fast", "yarn_beta_fast"),
                        ("yarn_beta_slow", "yarn_beta_slow"),
                        ("yarn_original_max_position_embeddings", "yarn_original_max_position_embeddings"),
                        ("yarn_correction_range_round_to_int", "yarn_correction_range_round_to_int")):
        setattr(config, field, getattr(args, name))


class _CausalSdpa(torch.nn.Module):
    """Parameter-free causal attention for MLA on the CPU, honouring the softmax scale MLA computes."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, **unused):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, **unused):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [batch, heads, seq, dim]
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


# --------------------------------------------------------------------------------------------
# MiniCPM's muP multipliers, from the checkpoint's args (MindSpeed-LLM's argument names)
# --------------------------------------------------------------------------------------------

MINICPM_ARGS = (
    "scale_emb",
    "scale_depth",
    "dim_model_base",
    "rope_scaling_type",
    "long_factor",
    "short_factor",
    "rope_scaling_original_max_position_embeddings",
)


def minicpm_longrope(args):
    """(factors, cos/sin multiplier) of MiniCPM's LongRoPE for these args, or None without it.

    Like the remote modeling_minicpm.py, the choice is static: long factors only when
    max_position_embeddings > original, and the multiplier sqrt(1 + ln(max/orig)/ln(orig)) is not
    clamped (it is below 1 when max < orig).
    """
    kind = getattr(args, "rope_scaling_type", None)
    if kind is None:
        return None
    if kind != "longrope":
        raise NotImplementedError(f"harness supports rope_scaling_type 'longrope' only, got {kind!r}")
    original = getattr(args, "rope_scaling_original_max_position_embeddings", None)
    short, long = getattr(args, "short_factor", None), getattr(args, "long_factor", None)
    if original is None or short is None or long is None:
        raise ValueError("longrope needs short_factor, long_factor and rope_scaling_original_max_position_embeddings")
    maximum = args.max_position_embeddings
    factors = long if maximum > original else short
    return [float(f) for f in factors], math.sqrt(1 + math.log(maximum / original) / math.log(original))


def minicpm_config_overrides(args):
    """TransformerConfig fields for LongRoPE's cos/sin multiplier m; empty when m == 1 or no LongRoPE.

    Multiplying cos and sin by m multiplies every rotated q and k by m, so every q.k by m**2 and nothing
    else: that is softmax_scale = m**2 / sqrt(head_dim). megatron-core 0.16.1 has no other hook for it
    (its rope `mscale` is fed from YaRN config fields only).
    """
    choice = minicpm_longrope(args)
    if choice is None or choice[1] == 1.0:
        return {}
    if args.rotary_percent != 1.0:
        raise NotImplementedError("a LongRoPE multiplier with rotary_percent < 1 is not supported")
    return {"softmax_scale": choice[1] ** 2 / math.sqrt(args.kv_channels)}


def apply_minicpm_multipliers(model, args):
    """Give a GPTModel MiniCPM's multipliers for whichever of MINICPM_ARGS `args` carries (None = absent).

    scale_emb multiplies the embedding output; scale_depth / sqrt(args.num_layers) multiplies each
    layer's self_attention and mlp outputs (both (output, bias) tuples) before the residual add;
    dim_model_base divides the final norm's output by hidden_size / dim_model_base, before the output
    layer; LongRoPE divides rotary_pos_emb.inv_freq by the chosen factors (the multiplier goes through
    `minicpm_config_overrides`). Forward hooks only, so state dicts are unchanged.
    """
    scale_emb = getattr(args, "scale_emb", None)
    scale_depth = getattr(args, "scale_depth", None)
    dim_model_base = getattr(args, "dim_model_base", None)
    if scale_emb is not None and model.pre_process:
        model.embedding.register_forward_hook(_output_times(scale_emb))
    if scale_depth is not None:
        branch = scale_depth / math.sqrt(args.num_layers)
        for layer in model.decoder.layers:
            layer.self_attention.register_forward_hook(_output_and_bias_times(branch))
            layer.mlp.register_forward_hook(_output_and_bias_times(branch))
    if dim_model_base is not None and model.post_process:
        divisor = args.hidden_size / dim_model_base  # divided, not multiplied by the inverse: as MiniCPM
        model.decoder.final_layernorm.register_forward_hook(lambda module, inputs, output: output / divisor)
    choice = minicpm_longrope(args)
    if choice is not None:
        mla = getattr(args, "multi_latent_attention", False)
        if mla and choice[1] != 1.0:
            raise NotImplementedError("harness: a LongRoPE multiplier with multi-latent attention is not supported")
        # MLA layers each have their own rotary embedding (of the rope part only)
        for rotary in [layer.self_attention.rotary_pos_emb for layer in model.decoder.layers] if mla else \
                [model.rotary_pos_emb]:
            if len(choice[0]) != rotary.inv_freq.numel():
                raise ValueError(f"LongRoPE has {len(choice[0])} factors, the rotary embedding {rotary.inv_freq.numel()}")
            # A plain attribute, read on every (lru-cached) forward: replace it before the first one.
            rotary.inv_freq = rotary.inv_freq / torch.tensor(choice[0], dtype=rotary.inv_freq.dtype)
    return model


def _output_times(factor):
    """Forward hook multiplying a module's tensor output."""

    def hook(module, inputs, output):
        if not torch.is_tensor(output):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, expected a tensor")
        return output * factor

    return hook


def _output_and_bias_times(factor):
    """Forward hook scaling an (output, bias) pair, as attention and MLP modules return it."""

    def hook(module, inputs, output):
        if not (isinstance(output, tuple) and len(output) == 2):
            raise TypeError(f"{type(module).__name__} did not return an (output, bias) pair")
        out, bias = output
        return out * factor, None if bias is None else bias * factor

    return hook


def megatron_lm_args():
    """The fixture Namespace, read as Megatron-LM reads its own checkpoints (weights_only, its classes allowed)."""
    return _read_rank_file(MEGATRON_LM_ARGS_FILE)


def norm_epsilon(args):
    """Megatron-LM has named it norm_epsilon (2023-2025) and layernorm_epsilon (before, and since 2026)."""
    return args.layernorm_epsilon if hasattr(args, "layernorm_epsilon") else args.norm_epsilon


def _read_rank_file(path):
    """torch.load with weights_only, allowing the Namespace and Megatron's enums in `args`."""
    with torch.serialization.safe_globals(_args_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def _args_globals():
    """Classes Megatron-LM pickles inside `args`: the Namespace and a few megatron enums."""
    from megatron.core import enums
    from megatron.core.transformer import enums as transformer_enums

    found = [argparse.Namespace, enums.ModelType, signal.Signals]
    for name in ("ModelType", "AttnBackend", "AttnMaskType", "CudaGraphScope"):
        if hasattr(transformer_enums, name):
            found.append(getattr(transformer_enums, name))
    for name in ("Fp8Recipe", "Fp4Recipe"):
        if hasattr(enums, name):
            found.append(getattr(enums, name))
    return found


def _layer_count(state):
    """Number of distinct (stage-local) layer indices in a state dict."""
    return len({m.group(1) for m in map(LAYER_KEY.fullmatch, state) if m})


def _checked_args(checkpoint, path, tp, pp, ep=1):
    """The file's args, after checking the top-level keys and that TP/PP match the folders."""
    if not isinstance(checkpoint, dict):
        raise TypeError(f"{path}: expected a dict, got {type(checkpoint).__name__}")
    missing = {"args", "checkpoint_version", "iteration", "model"} - checkpoint.keys()
    if missing:
        raise KeyError(f"{path}: missing top-level keys {sorted(missing)}")
    if checkpoint["checkpoint_version"] != CHECKPOINT_VERSION:
        # Megatron-LM reads QKV and the TP size differently below 3.0.
        raise ValueError(f"{path}: checkpoint_version {checkpoint['checkpoint_version']!r}, expected 3.0")
    args = checkpoint["args"]
    if not isinstance(args, argparse.Namespace):
        raise TypeError(f"{path}: args is a {type(args).__name__}, expected argparse.Namespace")
    found = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    if found != (tp, pp):
        raise ValueError(f"{path}: args say TP, PP = {found}, the rank folders say {(tp, pp)}")
    if getattr(args, "num_experts", None) and (getattr(args, "expert_model_parallel_size", 1) or 1) != ep:
        raise ValueError(f"{path}: args say EP {args.expert_model_parallel_size}, the harness was asked for EP {ep}")
    return args


def _load_strictly(model, state, te_names, path, grouped=False):
    """Load exactly the keys the model (TE or local spec) saves; anything else raises."""
    expected = model.state_dict()
    if te_names:
        expected = local_to_te_state_dict(expected, grouped)
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise KeyError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    if te_names:
        state = te_to_local_state_dict(state)
        # TE's MLA down projections are whole on every rank (TELinear, duplicated); the local spec splits them
        from megatron.core import parallel_state

        tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        state = {key: torch.chunk(value, tp)[rank] if re.search(r"linear_(q|kv)_down_proj\.weight$", key) else value
                 for key, value in state.items()}
    state = {
        key: value.float() if torch.is_tensor(value) and value.is_floating_point() else value
        for key, value in state.items()
    }
    model.load_state_dict(state, strict=True)


def _randomize(model, seed, tp_rank, std=INIT_STD):
    """Seeded weights: N(0, std) for matrices and biases, uniform around 1 for norm weights.

    Tensor-parallel shards are drawn per rank; replicated tensors (norms, row-parallel biases)
    are drawn from the name alone, so every rank holds the same copy, as in real training.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            sharded = getattr(param, "tensor_model_parallel", False)
            key = f"{seed}:{name}:{tp_rank if sharded else 'replicated'}"
            generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            if param.dim() == 1 and not name.endswith("bias"):
                values = torch.empty(param.shape).uniform_(NORM_LOW, NORM_HIGH, generator=generator)
            else:
                values = torch.randn(param.shape, generator=generator) * std
            param.copy_(values)
        for name, buffer in model.named_buffers():
            if name.endswith("expert_bias"):  # a routing bias far enough from 0 to change the choice
                generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def _forward(stages, tokens, mtp_logits=None):
    """Run the PP stages in order (no pipeline communication) and return float32 logits.

    A stage with multi-token-prediction layers computes their logits only inside its loss (megatron-core
    0.16.1 needs labels then), so it is given the tokens as labels, and both calls of its output layer
    are caught: each MTP depth's logits, then the main ones. With `mtp_logits` (a list) the MTP logits
    [batch, seq, vocab] are appended to it, depth by depth."""
    batch, seq = tokens.shape
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    mask = torch.triu(torch.ones(seq, seq), 1).bool()[None, None]
    output = None
    with torch.no_grad():
        for model in stages:
            mtp = getattr(model, "mtp_process", False)
            calls = []
            if mtp:
                # a copy: the loss computed from the logits then changes them in place
                hook = model.output_layer.register_forward_hook(lambda module, inputs, out: calls.append(out[0].clone()))
            labels = {"labels": tokens} if mtp else {}
            if model.pre_process:
                output = model(tokens, position_ids, mask, **labels)
            else:
                model.set_input_tensor(output)  # hidden states [seq, batch, hidden]
                output = model(tokens if mtp else None, position_ids, mask, **labels)
            if mtp:
                hook.remove()
                *depths, output = [logits.transpose(0, 1) for logits in calls]  # [batch, seq, vocab]
                if mtp_logits is not None:
                    mtp_logits.extend(depth.float().contiguous() for depth in depths)
    return output.float().contiguous()
