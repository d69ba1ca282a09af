"""Megatron checkpoints (Megatron-Core or legacy GPT) <-> message stream. The saver pads the vocabulary,
splits tensors for the target TP/PP with the schema's rules and hands them to a format sink; the loader
merges them back. Which names and nesting is the schema's business (megatron_schema)."""

import argparse
import re
from pathlib import Path

import torch

from converter_core import flags, layout, megatron_args, megatron_schema, output, protocol, vocab, workers
from converter_core.errors import ConversionError, require
from converter_core.formats import rank_files, torch_dist, torch_file
from converter_core.output import StagedFolder

CHECKPOINT_VERSION = 3.0


def add_saver_arguments(parser, title, default_impl="transformer_engine"):
    group = parser.add_argument_group(title=title)
    group.add_argument("--target-tensor-parallel-size", type=flags.positive_int, default=None,
                       help="TP size of the output (default: the source's, else 1)")
    group.add_argument("--target-pipeline-parallel-size", type=flags.positive_int, default=None,
                       help="PP size of the output (default: the source's, else 1)")
    group.add_argument("--target-expert-parallel-size", type=flags.positive_int, default=None,
                       help="EP size of the output: experts split over mp_rank_TT[_PPP]_EEE folders (default: the "
                            "source's, else 1)")
    group.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=None,
                       help="experts as TEGroupedMLP (TransformerEngine names linear_fc1.weight{E}) or, with --no-, "
                            "SequentialMLP (local_experts.{E}.linear_fc1.weight) (default: as the source says)")
    group.add_argument("--saver-transformer-impl", default=default_impl, choices=["local", "transformer_engine"],
                       help="parameter names to write: TransformerEngine or the local spec")
    group.add_argument("--megatron-path", type=str, default=None, help="accepted and ignored: Megatron is not needed")


def add_loader_arguments(parser, title, default_impl="transformer_engine"):
    group = parser.add_argument_group(title=title)
    group.add_argument("--true-vocab-size", type=flags.positive_int, default=None, help="vocabulary rows without padding")
    group.add_argument("--vocab-file", type=str, default=None, help="JSON vocabulary whose length is the true vocab size")
    group.add_argument("--megatron-path", type=str, default=None, help="accepted and ignored: Megatron is not needed")
    group.add_argument("--position-embedding-type", default="learned_absolute", choices=["learned_absolute", "rope"],
                       help="accepted for convert.py command lines; the checkpoint's args decide")
    group.add_argument("--loader-transformer-impl", default=default_impl, choices=["local", "transformer_engine"],
                       help="accepted; the name style is detected from the checkpoint")


def _staged_iteration(save_dir, iteration):
    final = Path(save_dir) / rank_files.iteration_dir_name(iteration)
    require(not final.exists(), f"{final}: already exists; choose another --save-dir")
    return StagedFolder(final)


class RankFilesSink:
    """Per-rank torch files (mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt), each streamed as tensors arrive.
    Everything but the experts is the same in every EP rank's file; EP rank e holds experts
    e * local .. (e + 1) * local - 1, numbered from 0 in it."""

    per_rank = True

    def __init__(self, save_dir, iteration, tp, pp, schema, args, ep=1, workers_count=1):
        self.save_dir, self.schema = Path(save_dir), schema
        self.workers = workers.Workers(workers_count)
        self.iteration, self.tp, self.pp, self.ep = iteration, tp, pp, ep
        self.staged = _staged_iteration(save_dir, iteration)
        self.files, self.models = {}, {}
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    folder = self.staged.path / rank_files.rank_dir_name(t, p, pp, e, ep)
                    folder.mkdir()
                    self.files[t, p, e] = torch_file.StreamingTorchFile(folder / rank_files.RANK_FILE)
                    self.models[t, p, e] = {}

    def put(self, stage, path, tensor, kind, ep_ranks=None):
        for t, shard in enumerate(layout.shard_parts(tensor, kind, self.tp)):  # assembled by the writer
            for e in range(self.ep) if ep_ranks is None else ep_ranks:
                megatron_schema.place(self.models[t, stage, e], path, self._write((t, stage, e), shard))

    def put_vocab(self, stage, path, table, rows):
        """A vocabulary table resized to `rows` and split over TP, one slice per rank as it is written:
        the resized table itself is never built (layout.vocab_shard_parts)."""
        for t, shard in enumerate(layout.vocab_shard_parts(table, rows, self.tp)):
            for e in range(self.ep):
                megatron_schema.place(self.models[t, stage, e], path, self._write((t, stage, e), shard))

    def put_value(self, stage, path, value):
        for t in range(self.tp):
            for e in range(self.ep):
                stored = self._write((t, stage, e), value) if torch.is_tensor(value) else value
                megatron_schema.place(self.models[t, stage, e], path, stored)

    def _write(self, rank, tensor):
        """Write a tensor into rank file `rank` (a job for any worker: its place in the file is fixed); return
        its stand-in."""
        file = self.files[rank]
        return file.tensor(tensor, lambda key, job: self.workers.submit((rank, key), lambda: _writing(file.path, job)))

    def put_layer(self, index, stage, local, name, value, kind, experts=False):
        if not experts:
            return self.put(stage, self.schema.layer(local, name), value, kind)
        stacked = value if isinstance(value, tuple) else (value,)
        per_rank = stacked[0].shape[0] // self.ep
        for expert in range(stacked[0].shape[0]):
            e, j = divmod(expert, per_rank)
            one = tuple(part[expert] for part in stacked)
            self.put(stage, self.schema.layer(local, name.format(j)), one if isinstance(value, tuple) else one[0],
                     kind, ep_ranks=[e])

    def put_layer_value(self, index, stage, local, name, value):
        self.put_value(stage, self.schema.layer(local, name), value)

    def finish(self, args):
        self.workers.finish()
        for rank, file in self.files.items():
            with output.writing(file.path):
                file.close({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": self.iteration,
                            "model": self.models[rank], "num_floating_point_operations_so_far": 0})
        self.staged.commit()
        rank_files.write_tracker(self.save_dir, self.iteration)

    def abandon(self):
        try:
            self.workers.abandon()
        finally:
            for file in self.files.values():
                file.abandon()
            self.staged.abandon()


def _writing(path, job):
    """Run a write job, failures named after `path` (output.writing)."""
    with output.writing(path):
        job()


class TorchDistSink:
    """A torch_dist iteration folder: full (unsplit) tensors, written as they arrive; Megatron reshards it
    to any TP/PP/EP when loading. As megatron-core's sharded_state_dict lays it out: layers stacked on a
    leading axis, one chunk per layer (per-layer keys `decoder.layers.N.*` instead when MoE and dense
    layers mix), experts stacked on the next axis under `mlp.experts.experts.*`."""

    per_rank = False

    def __init__(self, save_dir, iteration, tp, pp, schema, args, ep=1, workers_count=1):
        self.save_dir, self.iteration, self.num_layers = Path(save_dir), iteration, args.num_layers
        self.workers = workers.Workers(workers_count)
        kinds = megatron_args.moe_layers(args)
        self.per_layer_keys = any(kinds) and not all(kinds)
        self.experts = args.num_experts or 0
        # the local spec's keys map renames its norms in torch_dist (not in MLA layers; TE names are kept)
        self.local_renames = schema.impl == megatron_schema.LOCAL and not args.multi_latent_attention
        self.staged = _staged_iteration(save_dir, iteration)
        self.writer = torch_dist.DistWriter(self.staged.path)

    def _submit(self, job):
        """A job writing a chunk laid out in the data file: its place is fixed, so any worker may run it."""
        self.workers.submit(object(), lambda: _writing(self.writer.path, job))

    def put(self, stage, path, tensor, kind, shape=None):
        """One whole tensor as one chunk; `tensor` may be a tuple of parts (rows concatenated, of `shape`)."""
        key, shape = ".".join(path), shape or tuple(tensor.shape)
        self.writer.declare(key, (tensor[0] if isinstance(tensor, tuple) else tensor).dtype, shape)
        self._submit(self.writer.write_chunk(key, tensor, (0,) * len(shape)))

    def put_vocab(self, stage, path, table, rows):
        """One padded chunk, written from the table and its repeated last row (never a padded copy)."""
        self.put(stage, path, layout.vocab_shard_parts(table, rows, 1)[0], layout.COLUMN, (rows, *table.shape[1:]))

    def put_value(self, stage, path, value):
        pass  # output_layer._extra_state: Megatron-Core's sharded state dict leaves it out

    def _key(self, index, name):
        """(key, leading shape, leading offset) of layer `index`'s parameter `name`."""
        key = megatron_schema.dist_layer_key(name, self.local_renames)
        if self.per_layer_keys:
            return key.replace("decoder.layers.", f"decoder.layers.{index}.", 1), (), ()
        return key, (self.num_layers,), (index,)

    def put_layer(self, index, stage, local, name, value, kind, experts=False):
        # SwiGLU's [W; V] and Rows are written from their blocks, not built
        halves = tuple(block for half in (value if kind == layout.SWIGLU else (value,)) for block in layout.blocks(half))
        axis, first = int(experts), halves[0]
        shape = (*first.shape[:axis], sum(half.shape[axis] for half in halves), *first.shape[axis + 1:])
        key, lead, offset = self._key(index, name)
        if self.per_layer_keys or index == 0:
            self.writer.declare(key, first.dtype, (*lead, *shape))
        chunks = [((e,), tuple(half[e] for half in halves)) for e in range(shape[0])] if experts else [((), halves)]
        for expert, parts in chunks:
            self._submit(self.writer.write_chunk(key, parts, offset + expert + (0,) * parts[0].dim()))

    def put_layer_value(self, index, stage, local, name, value):
        module = name.removesuffix("._extra_state")
        expert = re.search(r"local_experts\.([0-9]+)\.", module)
        if expert:
            module = module.replace(expert.group(0), "experts.")
        elif module not in megatron_schema.DIST_EXTRA_STATE_MODULES:
            return
        key, lead, offset = self._key(index, module + "._extra_state")
        if expert:
            lead, offset = lead + (self.experts,), offset + (int(expert.group(1)),)
        shard = f"shard_{'.'.join(map(str, offset or (0,)))}_{'.'.join(map(str, lead or (1,)))}"
        name = f"{key}/{shard}"  # one string object for both entries: the pickled metadata shares it
        self._submit(self.writer.write_object(name, [value]))

    def finish(self, args):
        self.workers.finish()
        with output.writing(self.staged.path):
            self.writer.finish({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": self.iteration,
                                "num_floating_point_operations_so_far": 0,
                                "content_metadata": {"singleton_local_shards": False,
                                                     "chained_optim_avoid_prefix": True}})
        self.staged.commit()
        rank_files.write_tracker(self.save_dir, self.iteration)

    def abandon(self):
        try:
            self.workers.abandon()
        finally:
            self.writer.abandon()
            self.staged.abandon()


SINKS = {"torch": RankFilesSink, "torch_dist": TorchDistSink}


def output_args(md, args, tp, pp, schema, ckpt_format, ep=1):
    """The Megatron args written into the output: the stream's model args with the new layout."""
    margs = megatron_args.plain_copy(md.checkpoint_args)
    margs.tensor_model_parallel_size, margs.pipeline_model_parallel_size = tp, pp
    margs.expert_model_parallel_size = ep
    if getattr(margs, "num_experts", None):
        margs.expert_tensor_parallel_size = tp  # experts split like the dense MLP
    margs.world_size, margs.data_parallel_size = tp * pp * ep, ep
    margs.virtual_pipeline_model_parallel_size = margs.num_layers_per_virtual_pipeline_stage = None
    for uneven in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                   "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                   "pipeline_model_parallel_layout"):
        setattr(margs, uneven, None)  # the output splits layers evenly
    margs.transformer_impl, margs.ckpt_format = schema.impl, ckpt_format
    margs.use_dist_ckpt = ckpt_format == "torch_dist"
    margs.use_legacy_models, margs.use_mcore_models = schema.legacy, not schema.legacy
    margs.iteration = md.iteration
    margs.consumed_train_samples = getattr(md, "consumed_train_samples", 0)
    margs.consumed_valid_samples = getattr(md, "consumed_valid_samples", 0)
    megatron_args.set_dtype(margs, md.params_dtype)
    return margs


def save(queue, args, schema, ckpt_format="torch"):
    """Receive the stream and write it in `schema`'s names through the sink of `ckpt_format`."""
    receiver = protocol.Receiver(queue, args.checking, rows=True, stall_timeout=protocol.stall_timeout(args))
    md = receiver.metadata()
    where = f"saver ({args.save_dir})"
    protocol.check_supported(md, where)
    tp = args.target_tensor_parallel_size or md.previous_tensor_parallel_size or 1
    pp = args.target_pipeline_parallel_size or md.previous_pipeline_parallel_size or 1
    require(tp >= 1 and pp >= 1, f"{where}: parallel sizes must be at least 1, got TP {tp}, PP {pp}")
    experts = getattr(md.checkpoint_args, "num_experts", None) or 0
    ep = args.target_expert_parallel_size or (getattr(md.checkpoint_args, "expert_model_parallel_size", 1) or 1
                                              if experts else 1)
    require(ep == 1 or experts, f"{where}: expert parallel size {ep} for a model without experts")
    require(not experts or experts % ep == 0, f"{where}: expert parallel size {ep} does not divide the {experts} experts")
    margs = output_args(md, args, tp, pp, schema, ckpt_format, ep)
    written_format = "legacy" if schema.legacy else ckpt_format
    for setting, why in megatron_schema.FORMAT_LIMITS.get(written_format, {}).items():
        require(not getattr(margs, setting, None), f"{where}: {setting} cannot be written as {written_format}: {why}")
    megatron_args.check_tensor_parallel(margs, tp, where)
    require(pp <= md.num_layers, f"{where}: pipeline size {pp} exceeds the {md.num_layers} layers")
    per_stage = megatron_args.layers_per_stage(md.num_layers, pp, where)
    dtype, last = md.params_dtype, pp - 1
    if args.moe_grouped_gemm is not None:
        require(not args.moe_grouped_gemm or md.checkpoint_args.num_experts,
                f"{where}: --moe-grouped-gemm for a model without experts")
        margs.moe_grouped_gemm = args.moe_grouped_gemm
    naming = margs  # whose moe_grouped_gemm picks the expert names: torch_dist has one layout for both
    if ckpt_format == "torch" and not schema.legacy:
        schema.grouped(margs)  # refuses GroupedMLP (local names) before anything is written
    else:
        naming = megatron_args.plain_copy(margs)
        naming.moe_grouped_gemm = False

    sink = SINKS[ckpt_format](args.save_dir, md.iteration, tp, pp, schema, margs, ep, getattr(args, "workers", 1))
    try:
        message = receiver.get(protocol.EMBEDDINGS, {"word embeddings": (None, margs.hidden_size)})
        table = message.pop("word embeddings")
        receiver.check_consumed(message)
        rows = table.shape[0]
        if md.true_vocab_size:
            divisible = md.make_vocab_size_divisible_by or margs.make_vocab_size_divisible_by or 128
            rows = layout.padded_vocab_size(md.true_vocab_size, divisible, tp)
            margs.vocab_size = md.true_vocab_size
        else:
            protocol.report("note", message="Original vocab size not specified, leaving embedding table as-is.")
            require(rows % tp == 0, f"{where}: {rows} vocabulary rows do not split over TP {tp}; give --true-vocab-size")
        margs.padded_vocab_size = rows
        table = table.to(dtype)
        sink.put_vocab(0, schema.word_embeddings, table, rows)
        if not md.output_layer and pp > 1 and sink.per_rank:
            sink.put_vocab(last, schema.tied_output_layer, table, rows)

        for index in range(md.num_layers):
            message = receiver.get(protocol.layer_name(index), protocol.layer_message_shapes(margs, index))
            stage, local = divmod(index, per_stage)
            for entry in schema.entries(naming, index):
                tensors = [message.pop(key).to(protocol.stored_dtype(key, dtype)) for key in entry.keys]
                value = tuple(tensors) if entry.kind == layout.SWIGLU else tensors[0]
                sink.put_layer(index, stage, local, entry.name, value, entry.kind, entry.experts)
            for key, value in schema.layer_values(naming, index, experts // ep if sink.per_rank else experts).items():
                sink.put_layer_value(index, stage, local, key, value)
            receiver.check_consumed(message)

        message = receiver.get(protocol.FINAL_NORM, {key: (margs.hidden_size,) for key in final_norm_keys(margs)})
        for key in final_norm_keys(margs):
            sink.put(last, schema.final_norm(key), message.pop(key).to(dtype), layout.REPLICATED)
        receiver.check_consumed(message)
        if md.output_layer:
            message = receiver.get(protocol.OUTPUT_LAYER, {"weight": (None, margs.hidden_size)})
            weight = message.pop("weight")
            receiver.check_consumed(message)
            require(md.true_vocab_size or weight.shape[0] == margs.padded_vocab_size,
                    f"{where}: output layer has {weight.shape[0]} rows, embeddings {margs.padded_vocab_size}")
            sink.put_vocab(last, schema.output_layer, weight.to(dtype), margs.padded_vocab_size)
        for path, value in schema.last_stage_values().items():
            sink.put_value(last, path, value)
        receiver.done()
        sink.finish(margs)
    except BaseException:
        sink.abandon()
        raise
    protocol.report("saved", message=f"saved TP {tp} x PP {pp}{f' x EP {ep}' if ep > 1 else ''} checkpoint to "
                                     f"{args.save_dir}")


def final_norm_keys(args):
    return ["weight", "bias"] if args.normalization == "LayerNorm" else ["weight"]


def _old_qkv_to_grouped(shard, version, heads):
    """Checkpoint versions 0 and 1 ordered a rank's QKV rows [3, heads, d] / [heads, d, 3]; today's is
    [heads, 3, d] (Megatron-LM's fix_query_key_value_ordering). Multi-head attention only."""
    rest = shard.shape[1:]
    head_dim = shard.shape[0] // (3 * heads)
    if version == 0:
        grouped = shard.view(3, heads, head_dim, *rest).transpose(0, 1)
    else:
        grouped = shard.view(heads, head_dim, 3, *rest).transpose(1, 2)
    return grouped.reshape(shard.shape).contiguous()


def load(queue, args):
    """Stream a per-rank torch checkpoint (Megatron-Core or legacy): every rank file is memory-mapped,
    and each layer's TP shards are merged only when that layer is sent."""
    iteration, folder = rank_files.read_tracker(args.load_dir)
    if torch_dist.is_dist_checkpoint(folder):
        return load_dist(queue, args, iteration, folder)
    first = rank_files.first_rank_file(folder)
    state = torch_file.load(first)
    require(isinstance(state, dict) and "args" in state, f"{first}: no 'args' in the checkpoint")
    require(isinstance(state["args"], argparse.Namespace), f"{first}: 'args' is not an argparse.Namespace")
    margs = megatron_args.complete(state["args"], str(first))
    tp, pp = margs.tensor_model_parallel_size, margs.pipeline_model_parallel_size
    experts = margs.num_experts or 0
    ep = (margs.expert_model_parallel_size or 1) if experts else 1
    require(not experts or experts % ep == 0, f"{first}: EP {ep} does not divide the {experts} experts")
    require(getattr(margs, "expert_tensor_parallel_size", None) in (None, tp) or not experts,
            f"{first}: expert tensor parallel size {margs.expert_tensor_parallel_size} differs from TP {tp}; "
            "not supported")
    paths = rank_files.find_rank_files(folder, tp, pp, ep)
    require(paths[0, 0, 0] == first, f"{first}: not the first rank file of TP {tp} x PP {pp} x EP {ep}")
    states = {key: state if key == (0, 0, 0) else torch_file.load(path) for key, path in paths.items()}
    protocol.check_supported(protocol.make_metadata(margs, true_vocab_size=None), str(first))
    version = state.get("checkpoint_version", 0)
    chunks = sorted((k for k in state if re.fullmatch(r"model\d*", k)), key=lambda k: int(k[5:] or 0))
    require(chunks, f"{first}: no model state in the checkpoint")
    schema = megatron_schema.detect(state[chunks[0]])
    try:  # the layers its args describe are ones this converter knows (named after the file if not)
        if not schema.legacy:
            schema.grouped(margs)
        for index in range(margs.num_layers):
            schema.entries(margs, index)
    except ConversionError as error:
        raise ConversionError(f"{first}: {error}") from None
    if version < 2.0:
        require(schema.legacy and megatron_args.query_groups(margs) == margs.num_attention_heads,
                f"{first}: checkpoint_version {version} with grouped-query attention is not a known layout")
    models = {}
    for (t, p, e), rank_state in states.items():
        for chunk in chunks:
            require(chunk in rank_state, f"{paths[t, p, e]}: no {chunk!r} entry")
            models[t, p, e, chunk] = schema.normalize(rank_state[chunk])

    def tensor(t, p, chunk, path, e=0, shape=None):
        """The tensor at `path` of one rank file, which must have `shape` (None: any size along that axis)."""
        value = megatron_schema.lookup(models[t, p, e, chunk], path)
        require(torch.is_tensor(value), f"{paths[t, p, e]}: missing tensor {'.'.join(path)}")
        require(value.is_floating_point(), f"{paths[t, p, e]}: {'.'.join(path)} has dtype {value.dtype}, not a weight's")
        got = tuple(value.shape)
        require(shape is None or len(got) == len(shape) and all(w is None or w == g for w, g in zip(shape, got)),
                f"{paths[t, p, e]}: {'.'.join(path)} has shape {list(got)}, the args imply "
                f"{[w if w is not None else '*' for w in shape or ()]} on each of the {tp} TP ranks")
        return value

    order = []  # global layer -> (pp rank, chunk, local index)
    for chunk in chunks:
        for p in range(pp):
            indices = schema.layer_indices(models[0, p, 0, chunk])
            require(indices == set(range(len(indices))), f"{paths[0, p, 0]}: layer numbers {sorted(indices)} are not 0..n-1")
            order += [(p, chunk, j) for j in range(len(indices))]
    require(len(order) == margs.num_layers, f"{folder}: holds {len(order)} layers, args say {margs.num_layers}")
    _check_nothing_left_out(models, paths, schema, order, margs, experts // ep)
    heads_per_rank = margs.num_attention_heads // tp
    md = _metadata_for(margs, args, iteration, tp, pp)

    def merged(p, chunk, path, kind, full, old_qkv=False, e=0):
        """The TP shards of `path` merged (layout.merge), each first checked against the shard shape that
        the tensor's full shape `full` (SwiGLU: one half's) implies: a shard of the wrong shape would
        otherwise be written into its neighbours' rows or columns."""
        want = layout.shard_shape(full, kind, tp)
        if None in want:  # the vocabulary's padded rows: every rank has the first's
            want = tuple(tensor(0, p, chunk, path, e).shape[0] if w is None else w for w in want)
        shards = [tensor(t, p, chunk, path, e, want) for t in range(tp)]
        if old_qkv:
            shards = [_old_qkv_to_grouped(s, version, heads_per_rank) for s in shards]
        return layout.merge(shards, kind)

    def stacked(p, chunk, index, local, entry):
        """One tensor (or SwiGLU pair) per expert, gathered over the EP ranks, stacked in expert order."""
        full = protocol.layer_message_shapes(margs, index)[entry.keys[0]][1:]  # one expert's
        parts = [merged(p, chunk, schema.layer(local, entry.name.format(j)), entry.kind, full, e=e)
                 for e in range(ep) for j in range(experts // ep)]
        if entry.kind == layout.SWIGLU:
            return tuple(torch.stack([layout.tensor_of(part[half]) for part in parts]) for half in range(2))
        return torch.stack([layout.tensor_of(part) for part in parts])

    def messages():
        table = merged(0, chunks[0], schema.word_embeddings, layout.COLUMN, (None, margs.hidden_size))
        yield protocol.EMBEDDINGS, {"word embeddings": table}
        for index, (p, chunk, local) in enumerate(order):
            message, layer_shapes = {}, protocol.layer_message_shapes(margs, index)
            for entry in schema.entries(margs, index):
                path = schema.layer(local, entry.name)
                if entry.experts:
                    value = stacked(p, chunk, index, local, entry)
                else:
                    value = merged(p, chunk, path, entry.kind, layer_shapes[entry.keys[0]],
                                   old_qkv=version < 2.0 and "qkv" in entry.keys[0])
                for key, part in zip(entry.keys, value if entry.kind == layout.SWIGLU else (value,)):
                    require(tuple(part.shape) == layer_shapes[key],
                            f"{paths[0, p, 0]}: {'.'.join(path)} gives {key!r} of shape {list(part.shape)}, "
                            f"the args imply {list(layer_shapes[key])}")
                    message[key] = part
            yield protocol.layer_name(index), message
        p, chunk = pp - 1, chunks[-1]
        yield protocol.FINAL_NORM, {key: merged(p, chunk, schema.final_norm(key), layout.REPLICATED, (margs.hidden_size,))
                                    for key in final_norm_keys(margs)}
        if md.output_layer:
            weight = merged(p, chunk, schema.output_layer, layout.COLUMN, (None, margs.hidden_size))
            require(weight.shape == table.shape,
                    f"{paths[0, p, 0]}: output layer shape {list(weight.shape)} differs from the embeddings {list(table.shape)}")
            yield protocol.OUTPUT_LAYER, {"weight": weight}

    protocol.send_model(queue, md, messages(), protocol.stall_timeout(args))


def _tensor_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _tensor_paths(value, prefix + (key,))
        elif torch.is_tensor(value):
            yield prefix + (key,)


def _check_nothing_left_out(models, paths, schema, order, margs, local_experts):
    """Every tensor of every rank file is one this converter carries: a parameter it does not know
    (an expert bias, multi-token prediction, ...) is refused rather than dropped."""
    layers = {}  # (pp rank, chunk) -> {local index: global index}
    for index, (p, chunk, local) in enumerate(order):
        layers.setdefault((p, chunk), {})[local] = index
    for (t, p, e, chunk), model in models.items():
        known = {schema.word_embeddings, schema.output_layer, schema.tied_output_layer}
        known |= {schema.final_norm(key) for key in final_norm_keys(margs)}
        for local, index in layers.get((p, chunk), {}).items():
            for entry in schema.entries(margs, index):
                names = [entry.name.format(j) for j in range(local_experts)] if entry.experts else [entry.name]
                known |= {schema.layer(local, name) for name in names}
        for path in _tensor_paths(model):
            require(path in known or path[-1].endswith("_extra_state"),
                    f"{paths[t, p, e]}: holds {'.'.join(path)}, a parameter this converter does not carry")


def _metadata_for(margs, args, iteration, tp, pp):
    true_vocab = args.true_vocab_size or vocab.vocab_file_size(args.vocab_file) or margs.vocab_size
    return protocol.make_metadata(margs, true_vocab_size=true_vocab, previous_tp=tp, previous_pp=pp,
                                  iteration=iteration or 1,
                                  consumed_train_samples=getattr(margs, "consumed_train_samples", 0) or 0,
                                  consumed_valid_samples=getattr(margs, "consumed_valid_samples", 0) or 0)


def load_dist(queue, args, iteration, folder):
    """Stream a torch_dist checkpoint: args from common.pt, then each layer sliced out of the stacked
    `decoder.layers.*` tensors (or per-layer keys), memory-mapped; optimizer and extra states skipped."""
    margs = megatron_args.complete(torch_dist.read_common(folder)["args"], str(folder / torch_dist.COMMON))
    reader = torch_dist.DistReader(folder)
    where = folder / torch_dist.DCP_METADATA
    protocol.check_supported(protocol.make_metadata(margs, true_vocab_size=None), str(folder / torch_dist.COMMON))
    layers, hidden = margs.num_layers, margs.hidden_size
    try:  # the layers its args describe are ones this converter knows (named after the file if not)
        for index in range(layers):
            megatron_schema.layer_entries(margs, index)
    except ConversionError as error:
        raise ConversionError(f"{folder / torch_dist.COMMON}: {error}") from None

    def expected(entry, index):
        shape = protocol.layer_message_shapes(margs, index)[entry.keys[0]]
        axis = 1 if entry.experts else 0  # SwiGLU's [W; V] rows, after the expert axis
        return (*shape[:axis], 2 * shape[axis], *shape[axis + 1:]) if entry.kind == layout.SWIGLU else shape

    def source_of(candidates, index):
        """(key, index along the stacked axis or None) holding an entry of layer `index`: under the
        stacked key or a per-layer one, as TransformerEngine's or the local spec names it."""
        for stacked in candidates:
            per_layer = stacked.replace("decoder.layers.", f"decoder.layers.{index}.", 1)
            if stacked in reader or per_layer in reader:
                return (stacked, index) if stacked in reader else (per_layer, None)
        return candidates[0], index

    for index in range(layers):
        for entry, candidates in megatron_schema.dist_layer_candidates(margs, index):
            key, position = source_of(candidates, index)
            require(key in reader, f"{where}: no tensor {' or '.join(candidates)} (the args describe {layers} layers "
                                   "of this model)")
            want = ((layers,) if position is not None else ()) + expected(entry, index)
            require(reader.shape(key) == want,
                    f"{where}: {key} has shape {list(reader.shape(key))}, the args in {torch_dist.COMMON} imply {list(want)}")
    table_key, norm_key = "embedding.word_embeddings.weight", "decoder.final_layernorm"
    require(table_key in reader and reader.shape(table_key)[1:] == (hidden,),
            f"{where}: {table_key} missing or not [vocab, {hidden}]")
    for key in final_norm_keys(margs):
        require(f"{norm_key}.{key}" in reader and reader.shape(f"{norm_key}.{key}") == (hidden,),
                f"{where}: {norm_key}.{key} missing or not [{hidden}]")
    untied = megatron_args.untied(margs)
    if untied:
        require(reader.shape("output_layer.weight") == reader.shape(table_key) if "output_layer.weight" in reader else False,
                f"{where}: output_layer.weight missing or not shaped like the embeddings")
    md = _metadata_for(margs, args, iteration, margs.tensor_model_parallel_size, margs.pipeline_model_parallel_size)

    def messages():
        yield protocol.EMBEDDINGS, {"word embeddings": reader.read(table_key)}
        for index in range(layers):
            message = {}
            for entry, candidates in megatron_schema.dist_layer_candidates(margs, index):
                tensor = reader.read(*source_of(candidates, index))
                parts = torch.chunk(tensor, 2, dim=int(entry.experts)) if entry.kind == layout.SWIGLU else (tensor,)
                message.update(zip(entry.keys, parts))
            yield protocol.layer_name(index), message
        yield protocol.FINAL_NORM, {key: reader.read(f"{norm_key}.{key}") for key in final_norm_keys(margs)}
        if untied:
            yield protocol.OUTPUT_LAYER, {"weight": reader.read("output_layer.weight")}

    protocol.send_model(queue, md, messages(), protocol.stall_timeout(args))
