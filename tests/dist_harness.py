"""Megatron-Core as the independent truth for `--ckpt-format torch_dist` checkpoints.

Like `mcore_harness` (whose functions this module reuses) but for the distributed format:

* `save_dist_checkpoint` writes a seeded random GPTModel the way Megatron-LM training saves
  torch_dist (`megatron.core.dist_checkpointing.save`), with that model's own logits;
* `dist_logits` loads a torch_dist checkpoint into a fresh GPTModel at any TP (Megatron reshards
  on load), strictly, and returns its logits.

It must never import converter_core. Megatron only runs in rank processes (mcore_harness._run_ranks), one per TP rank.
"""

import argparse
import os

import torch

from mcore_harness import (
    CHECKPOINT_VERSION,
    DEFAULT_TIMEOUT,
    TRACKER_FILE,
    _args_globals,
    _forward,
    _gpt_model,
    _megatron_cpu,
    _randomize,
    _run_ranks,
    megatron_args,
)

COMMON_FILE = "common.pt"
CONFIG_FILE = "metadata.json"
DCP_METADATA_FILE = ".metadata"

# Megatron-LM's `_build_sharded_state_dict_metadata` without a distributed optimizer, after
# `_clean_metadata_for_serialization` drops the (unpicklable) dp_cp_group.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


def save_dist_checkpoint(
    save_dir, *, tokens, tp=1, seed=0, iteration=1, timeout=DEFAULT_TIMEOUT, **args_overrides
):
    """Save a seeded random megatron-core GPTModel as Megatron-LM's `--ckpt-format torch_dist`.

    Writes `<save_dir>/iter_{iteration:07d}/` (common.pt, .metadata, __*_*.distcp,
    metadata.json) from `tp` ranks, then the tracker file. Returns (iteration_dir, logits):
    the logits that model gives for `tokens`, the reference a converted checkpoint must match.
    `args_overrides` are Megatron-LM argument names, as for `mcore_harness.megatron_args`.
    """
    overrides = {"ckpt_format": "torch_dist", "use_dist_ckpt": True}
    overrides.update(args_overrides)
    args = megatron_args(tp=tp, iteration=iteration, **overrides)
    save_dir = os.path.abspath(save_dir)  # the rank processes do not share our working directory
    iter_dir = os.path.join(save_dir, f"iter_{iteration:07d}")
    if os.path.exists(iter_dir):
        raise FileExistsError(f"{iter_dir} exists; old shards would mix with new ones")
    os.makedirs(iter_dir)
    tokens = _tokens(tokens)
    logits = _run_ranks(_save_worker, tp, (iter_dir, args, seed, tokens), timeout)
    with open(os.path.join(save_dir, TRACKER_FILE), "w") as tracker:
        tracker.write(str(iteration))
    return iter_dir, logits


def dist_logits(iter_dir, tokens, tp=1, timeout=DEFAULT_TIMEOUT):
    """Float32 logits [batch, seq, padded_vocab] of a torch_dist checkpoint, run at TP `tp`.

    The model is built from the args in common.pt and loaded with `dist_checkpointing.load`
    (strict: a tensor missing from, or unexpected in, the checkpoint raises), then with
    `load_state_dict(strict=True)`, as Megatron-LM's `load_checkpoint` does.
    """
    iter_dir = os.path.abspath(iter_dir)  # the rank processes do not share our working directory
    if not os.path.isdir(iter_dir):
        raise FileNotFoundError(iter_dir)
    return _run_ranks(_load_worker, tp, (iter_dir, _tokens(tokens)), timeout)


def resave_dist_checkpoint(iter_dir, save_dir, tp=1, timeout=DEFAULT_TIMEOUT):
    """Load a torch_dist checkpoint strictly into a GPTModel at TP `tp` (as dist_logits) and save it again
    with megatron-core's own `dist_checkpointing.save`, under the same args and iteration, as
    `<save_dir>/iter_*` and the tracker. Returns that iteration folder: what megatron-core writes for
    the same weights, keys, shapes and chunks of its own sharded_state_dict."""
    iter_dir, save_dir = os.path.abspath(iter_dir), os.path.abspath(save_dir)
    iteration = int(os.path.basename(iter_dir).removeprefix("iter_"))
    target = os.path.join(save_dir, f"iter_{iteration:07d}")
    os.makedirs(target)
    _run_ranks(_load_worker, tp, (iter_dir, None, target), timeout)
    with open(os.path.join(save_dir, TRACKER_FILE), "w") as tracker:
        tracker.write(str(iteration))
    return target


def torch_dist_tensors(iter_dir):
    """{key: whole tensor} of a torch_dist checkpoint, read with torch's own DCP reader (no objects)."""
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(os.fspath(iter_dir)).read_metadata().state_dict_metadata
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in stored.items() if hasattr(meta, "size")}
    dcp.load(tensors, checkpoint_id=os.fspath(iter_dir), no_dist=True)
    return tensors


def read_common(iter_dir):
    """common.pt, loaded with weights_only and only the classes Megatron pickles in `args`.

    Needs megatron importable (for its enums); call it in a child or where that is fine.
    """
    path = os.path.join(os.fspath(iter_dir), COMMON_FILE)
    # Only add what is not allowed yet: leaving `safe_globals` removes its classes even if
    # megatron.core had registered them globally, and Megatron's own load of common.pt needs them.
    allowed = torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([g for g in _args_globals() if g not in allowed]):
        common = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(common, dict) or not {"args", "checkpoint_version", "iteration"} <= common.keys():
        raise KeyError(f"{path}: expected a dict with args, checkpoint_version and iteration")
    if common["checkpoint_version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint_version {common['checkpoint_version']!r}, expected 3.0")
    if not isinstance(common["args"], argparse.Namespace):
        raise TypeError(f"{path}: args is a {type(common['args']).__name__}, expected Namespace")
    return common


def _tokens(tokens):
    """Token ids as a [batch, seq] long tensor."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    return tokens


# --------------------------------------------------------------------------------------------
# Child side: runs in rank processes, where megatron may be imported
# --------------------------------------------------------------------------------------------


def _sharded_metadata(content_metadata):
    """The `metadata` Megatron-LM passes to `sharded_state_dict`: content flags + dp_cp_group."""
    from megatron.core import parallel_state

    metadata = dict(content_metadata or {})
    metadata["dp_cp_group"] = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return metadata


def _save_worker(rank, tp, port, out_path, iter_dir, args, seed, tokens):
    """One TP rank: random model, its logits, then its shards as Megatron-LM's save_checkpoint."""
    with _megatron_cpu(rank, tp, port):
        model = _gpt_model(args, args.num_layers, pre_process=True, post_process=True)
        _randomize(model, seed, rank)
        logits = _forward([model], tokens)
        _save(model, args, iter_dir)
        if rank == 0:
            torch.save(logits, out_path)


def _save(model, args, iter_dir):
    """This rank's shards of `model`, as Megatron-LM's save_checkpoint writes them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    # Same keys, same order as Megatron-LM's generate_state_dict (no optimizer, no rng).
    state = {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": args.iteration,
        "model": model.sharded_state_dict(metadata=_sharded_metadata(CONTENT_METADATA)),
        "num_floating_point_operations_so_far": 0,
    }
    dist_checkpointing.save(
        state,
        iter_dir,
        sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1),
        validate_access_integrity=True,
        content_metadata=dict(CONTENT_METADATA),
    )


def _load_worker(rank, tp, port, out_path, iter_dir, tokens, save_to=None):
    """One TP rank: model from common.pt args, strict dist load, forward (`tokens`) or save again (into
    folder `save_to`)."""
    with _megatron_cpu(rank, tp, port):
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy
        from megatron.core.dist_checkpointing.validation import StrictHandling

        if not dist_checkpointing.check_is_distributed_checkpoint(iter_dir):
            raise FileNotFoundError(f"{iter_dir}: no {CONFIG_FILE}, not a torch_dist checkpoint")
        common = read_common(iter_dir)
        args = common["args"]
        if args.padded_vocab_size % tp:
            raise ValueError(f"padded_vocab_size {args.padded_vocab_size} does not split over TP {tp}")
        model = _gpt_model(args, args.num_layers, pre_process=True, post_process=True)
        sharded = model.sharded_state_dict(metadata=_sharded_metadata(common.get("content_metadata")))
        _check_vocab_shapes(sharded, iter_dir)
        loaded = dist_checkpointing.load(
            {"model": sharded},
            iter_dir,
            TorchDistLoadShardedStrategy(),
            validate_access_integrity=True,
            strict=StrictHandling.RAISE_ALL,
        )
        model.load_state_dict(loaded["model"], strict=True)
        if save_to:
            _save(model, args, save_to)
            if rank == 0:
                torch.save(torch.empty(0), out_path)
            return
        logits = _forward([model], tokens)
        if rank == 0:
            torch.save(logits, out_path)


def _check_vocab_shapes(sharded, iter_dir):
    """Refuse what Megatron would load silently: vocab tensors of another padded size.

    Megatron marks the word embeddings and the output layer `allow_shape_mismatch` and then
    zero-fills or crops them, so a wrongly padded vocabulary would otherwise pass.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(iter_dir).read_metadata().state_dict_metadata
    for tensor in nested_values(sharded):
        if isinstance(tensor, ShardedTensor) and tensor.allow_shape_mismatch and tensor.key in stored:
            found = tuple(stored[tensor.key].size)
            if found != tuple(tensor.global_shape):
                raise ValueError(
                    f"{iter_dir}: {tensor.key} has global shape {found}, the model built from "
                    f"common.pt args expects {tuple(tensor.global_shape)}"
                )
