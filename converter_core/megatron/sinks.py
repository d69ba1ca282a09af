"""Where the Megatron saver's tensors go: one sink per output format, each behind the Sink interface,
so the saver splits and names tensors once for every format."""

import abc
import math
import re
from pathlib import Path

import torch

from converter_core import layout, output, protocol, share as sharing, workers
from converter_core.errors import require
from converter_core.formats import rank_files, torch_dist, torch_file
from converter_core.megatron import args as megatron_args, keys as message_keys, schema as megatron_schema
from converter_core.megatron.keys import MTP_TRANSFORMER_LAYER
from converter_core.output import StagedFolder

CHECKPOINT_VERSION = 3.0


def staged_iteration(save_dir, iteration, share=None, gate=None):
    """The iteration folder's staging: the run's own, or with a Share the job's (every rank's and the finisher's);
    `gate`: the run's output.commit_gate(args)."""
    final = Path(save_dir) / rank_files.iteration_dir_name(iteration)
    require(not final.exists(), f"{final}: already exists; choose another --save-dir")
    return StagedFolder(final, job=share and share.job, gate=gate)


def finish_output(save_dir, staged, pieces):
    """Once every rank's files are written (`pieces`: each rank's, from a sink's finish): torch_dist's
    .metadata from every rank's chunks, or a check that every rank file is there; then the commit, and the
    tracker last. A run of one process calls it with its own pieces; a job's finisher with every rank's."""
    first = pieces[0]
    if first["format"] == "torch_dist":
        with output.writing(staged.path):
            torch_dist.write_metadata(staged.path, [piece["dist"] for piece in pieces])
    else:
        written = sorted(name for piece in pieces for name in piece["files"])
        require(written == sorted(first["all_files"]),
                f"{staged.path}: the ranks wrote {written[:4]}, not the planned rank files {first['all_files'][:4]}")
        for name in written:
            path = staged.path / name / rank_files.RANK_FILE
            require(path.is_file(), f"{path}: missing (a rank wrote it elsewhere?)")
    staged.commit()
    rank_files.write_tracker(save_dir, first["iteration"], staged.gate)


def layer_bytes(args, index, ep=1):
    """The bytes of layer `index` in one EP rank's files, all TP ranks together (experts divided over EP):
    what a Share balances files by, the same on every rank."""
    total = 0
    for key in message_keys.layer_keys(args, index):
        size = math.prod(key.size(args)) * protocol.stored_dtype(key.name, args.params_dtype).itemsize
        total += size // ep if key.experts else size
    return total


def vocab_bytes(args):
    """The bytes of one vocabulary table, as layer_bytes (from the args: the table has not arrived yet)."""
    rows = getattr(args, "padded_vocab_size", None) or getattr(args, "vocab_size", None) or 0
    return rows * args.hidden_size * args.params_dtype.itemsize


class Sink(abc.ABC):
    """What the saver calls on a sink, in this order: built as
    `Sink(save_dir, iteration, tp, pp, schema, args, ep, workers_count, share, gate)` (`args`: the output's
    Megatron args; `share`: a converter_core.share.Share or None; `gate`: the run's output.commit_gate),
    then the put_* methods as the stream's tensors arrive, then finish(args) once, or abandon() on any
    failure. `stage` is a pipeline rank, `path` a tuple of dict keys in `schema`'s names, `kind` a layout TP
    rule; tensors are full (unsplit): splitting them for TP / EP is the sink's job. With a share the sink writes only its rank's files, and finish() hands its
    pieces over (share.write_pieces) instead of committing; finish_output commits."""

    # One file per rank: a tied output layer then needs its own copy on the last stage, and expert
    # numbers are local to an EP rank.
    per_rank = True

    def needs_layer(self, index, stage):
        """Whether layer `index` (on pipeline `stage`) goes into a file of this rank (else the saver skips its
        conversions)."""
        return True

    def _finished(self, pieces):
        """A run of one process commits; a rank of a job hands its pieces to the finisher."""
        if self.share is None:
            finish_output(self.save_dir, self.staged, [pieces])
        else:
            sharing.write_pieces(self.share, pieces)

    @abc.abstractmethod
    def put(self, stage, path, tensor, kind):
        """One tensor outside the layers (the final norm), split by `kind`."""

    @abc.abstractmethod
    def put_vocab(self, stage, path, table, rows):
        """A vocabulary table, padded or trimmed to `rows` (its last row repeated) as it is written."""

    @abc.abstractmethod
    def put_value(self, stage, path, value):
        """A non-parameter entry outside the layers (output_layer._extra_state), the same on each rank of
        `stage`."""

    @abc.abstractmethod
    def put_layer(self, index, stage, local, name, value, kind, experts=False):
        """Parameter `name` of layer `index` (`local` within its stage; index num_layers + i is
        multi-token-prediction layer i, on the last stage, `local` None); `value` is a (W, V) tuple for
        SwiGLU, and with `experts` holds every expert stacked on a leading axis."""

    @abc.abstractmethod
    def put_layer_value(self, index, stage, local, name, value):
        """A layer's non-parameter entry (`..._extra_state`)."""

    @abc.abstractmethod
    def finish(self, args):
        """Write what is left of this rank's files; then commit the staged output and write the tracker last
        (_finished)."""

    @abc.abstractmethod
    def abandon(self):
        """Stop the writers and remove the staged output."""


class RankFilesSink(Sink):
    """Per-rank torch files (mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt), each streamed as tensors arrive.
    Everything but the experts is the same in every EP rank's file; EP rank e holds experts
    e * local .. (e + 1) * local - 1, numbered from 0 in it."""

    per_rank = True

    def __init__(self, save_dir, iteration, tp, pp, schema, args, ep=1, workers_count=1, share=None, gate=None):
        self.save_dir, self.schema, self.share = Path(save_dir), schema, share
        self.workers = workers.Workers(workers_count)
        self.iteration, self.tp, self.pp, self.ep = iteration, tp, pp, ep
        self.num_layers = args.num_layers
        self.whole_experts = getattr(args, "expert_tensor_parallel_size", None) == 1
        self.staged = staged_iteration(save_dir, iteration, share, gate)
        self.names = {(t, p, e): rank_files.rank_dir_name(t, p, pp, e, ep)
                      for t in range(tp) for p in range(pp) for e in range(ep)}
        mine = set(self.names.values())
        if share is not None:  # files balanced by their estimated bytes: every TP x EP file of a stage alike
            stages = [0] * pp
            for index in range(args.num_layers + megatron_args.mtp_layers(args)):
                stages[min(index // (args.num_layers // pp), pp - 1)] += layer_bytes(args, index, ep)
            stages[0] += vocab_bytes(args)
            stages[-1] += vocab_bytes(args) if megatron_args.untied(args) or pp > 1 else 0
            # stage by stage, the TP ranks of one EP rank together: a run of files then reads a stretch of
            # layers whole (a row-parallel weight's TP shards interleave on every page)
            order = sorted(self.names, key=lambda rank: (rank[1], rank[2], rank[0]))
            mine = set(share.mine([(self.names[t, p, e], stages[p] // tp) for t, p, e in order]))
        self.files, self.models = {}, {}
        for rank, name in self.names.items():
            if name in mine:
                folder = self.staged.path / name
                folder.mkdir()
                self.files[rank] = torch_file.StreamingTorchFile(folder / rank_files.RANK_FILE)
                self.models[rank] = {}

    def needs_layer(self, index, stage):
        return any(p == stage for _, p, _ in self.files)

    def put(self, stage, path, tensor, kind, ep_ranks=None, whole=False):
        """`whole`: every TP rank holds the whole tensor, split by `kind` as if TP were 1 (experts when the
        args' expert_tensor_parallel_size is 1)."""
        shards = layout.shard_parts(tensor, kind, 1) * self.tp if whole else layout.shard_parts(tensor, kind, self.tp)
        for t, shard in enumerate(shards):  # assembled by the writer
            for e in range(self.ep) if ep_ranks is None else ep_ranks:
                if (t, stage, e) in self.files:
                    megatron_schema.place(self.models[t, stage, e], path, self._write((t, stage, e), shard))

    def put_vocab(self, stage, path, table, rows):
        """A vocabulary table resized to `rows` and split over TP, one slice per rank as it is written:
        the resized table itself is never built (layout.vocab_shard_parts)."""
        for t, shard in enumerate(layout.vocab_shard_parts(table, rows, self.tp)):
            for e in range(self.ep):
                if (t, stage, e) in self.files:
                    megatron_schema.place(self.models[t, stage, e], path, self._write((t, stage, e), shard))

    def put_value(self, stage, path, value):
        for t in range(self.tp):
            for e in range(self.ep):
                if (t, stage, e) not in self.files:
                    continue
                stored = self._write((t, stage, e), value) if torch.is_tensor(value) else value
                megatron_schema.place(self.models[t, stage, e], path, stored)

    def _write(self, rank, tensor):
        """Write a tensor into rank file `rank` (a job for any worker: its place in the file is fixed); return
        its stand-in."""
        file = self.files[rank]
        return file.tensor(tensor, lambda key, job: self.workers.submit((rank, key), lambda: _writing(file.path, job)))

    def put_layer(self, index, stage, local, name, value, kind, experts=False):
        if not experts:
            return self.put(stage, self.schema.layer_path(self.num_layers, index, local, name), value, kind)
        stacked = value if isinstance(value, tuple) else (value,)
        per_rank = stacked[0].shape[0] // self.ep
        for expert in range(stacked[0].shape[0]):
            e, j = divmod(expert, per_rank)
            one = tuple(part[expert] for part in stacked)
            self.put(stage, self.schema.layer_path(self.num_layers, index, local, name.format(j)),
                     one if isinstance(value, tuple) else one[0], kind, ep_ranks=[e], whole=self.whole_experts)

    def put_layer_value(self, index, stage, local, name, value):
        self.put_value(stage, self.schema.layer_path(self.num_layers, index, local, name), value)

    def finish(self, args):
        self.workers.finish()
        for rank, file in self.files.items():
            with output.writing(file.path):
                file.close({"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": self.iteration,
                            "model": self.models[rank], "num_floating_point_operations_so_far": 0})
        self._finished({"format": "torch", "iteration": self.iteration, "all_files": list(self.names.values()),
                        "files": [self.names[rank] for rank in self.files]})

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


def _layer_pattern(frequency):
    """megatron-core's rule (TransformerBlock.sharded_state_dict): a layer pattern given as a list (even one
    whose layers are all alike) or an int above 1 keys every layer of torch_dist on its own; otherwise the
    layers are stacked on one axis."""
    return isinstance(frequency, (list, tuple)) or (frequency or 1) > 1


class TorchDistSink(Sink):
    """A torch_dist iteration folder: full (unsplit) tensors, written as they arrive; Megatron reshards it
    to any TP/PP/EP when loading. As megatron-core's sharded_state_dict lays it out: layers stacked on a
    leading axis, one chunk per layer (per-layer keys `decoder.layers.N.*` instead when moe_layer_freq or
    linear_attention_freq is a pattern, _layer_pattern), experts stacked on the next axis under
    `mlp.experts.experts.*`, a fused parameter whose keys name parts as one tensor per part."""

    per_rank = False

    def __init__(self, save_dir, iteration, tp, pp, schema, args, ep=1, workers_count=1, share=None, gate=None):
        self.save_dir, self.iteration, self.num_layers = Path(save_dir), iteration, args.num_layers
        self.share = share
        self.workers = workers.Workers(workers_count)
        self.per_layer_keys = any(_layer_pattern(getattr(args, name, None))
                                  for name in ("moe_layer_freq", "linear_attention_freq"))
        self.args, self.spec = args, schema.impl
        self.experts = args.num_experts or 0
        # the local spec's keys map renames its norms in torch_dist (not in MLA layers; TE names are kept)
        self.local_renames = schema.impl == megatron_schema.LOCAL and not args.multi_latent_attention
        self.staged = staged_iteration(save_dir, iteration, share, gate)
        self.writer = torch_dist.DistWriter(self.staged.path, share.rank if share else 0)
        self.mine = None  # every unit
        if share is not None:  # units: each layer, and each tensor outside the layers (any other: rank 0's)
            def layers(indices):
                return [(f"layer {index}", layer_bytes(args, index)) for index in indices]

            units = [(".".join(schema.word_embeddings), vocab_bytes(args))] + layers(range(args.num_layers))
            units += [(".".join(schema.final_norm(key)), args.hidden_size * args.params_dtype.itemsize)
                      for key in megatron_schema.final_norm_keys(args)]
            units += [(".".join(schema.output_layer), vocab_bytes(args))] if megatron_args.untied(args) else []
            units += layers(range(args.num_layers, args.num_layers + megatron_args.mtp_layers(args)))
            self.units = {key for key, _ in units}  # in the stream's order
            self.mine = set(share.mine(units))

    def _mine(self, unit):
        if self.mine is None:
            return True
        return unit in self.mine if unit in self.units else self.share.rank == 0

    def needs_layer(self, index, stage):
        return self._mine(f"layer {index}")

    def _submit(self, job):
        """A job writing a chunk laid out in the data file: its place is fixed, so any worker may run it.
        None: another rank's chunk."""
        if job is not None:
            self.workers.submit(object(), lambda: _writing(self.writer.path, job))

    def put(self, stage, path, tensor, kind, shape=None):
        """One whole tensor as one chunk; `tensor` may be a tuple of parts (rows concatenated, of `shape`)."""
        key, shape = ".".join(path), shape or tuple(tensor.shape)
        self.writer.declare(key, (tensor[0] if isinstance(tensor, tuple) else tensor).dtype, shape)
        self._submit(self.writer.write_chunk(key, tensor, (0,) * len(shape), self._mine(key)))

    def put_vocab(self, stage, path, table, rows):
        """One padded chunk, written from the table and its repeated last row (never a padded copy)."""
        self.put(stage, path, layout.vocab_shard_parts(table, rows, 1)[0], layout.COLUMN, (rows, *table.shape[1:]))

    def put_value(self, stage, path, value):
        pass  # output_layer._extra_state: Megatron-Core's sharded state dict leaves it out

    def _key(self, index, name):
        """(key, leading shape, leading offset) of layer `index`'s parameter `name` (MTP layers: one key each)."""
        if index >= self.num_layers:
            return megatron_schema.dist_mtp_key(index - self.num_layers, name, self.local_renames), (), ()
        key = megatron_schema.dist_layer_key(name, self.local_renames)
        if self.per_layer_keys:
            return key.replace("decoder.layers.", f"decoder.layers.{index}.", 1), (), ()
        return key, (self.num_layers,), (index,)

    def put_layer(self, index, stage, local, name, value, kind, experts=False):
        if kind == layout.SWIGLU and (parts := megatron_schema.dist_parts(self.args, index, name, self.spec)):
            for (part, _), tensor in zip(parts, value):  # each part its own tensor (LayerKey.dist_part)
                self.put_layer(index, stage, local, part, tensor, layout.COLUMN)
            return
        # SwiGLU's [W; V] and Rows are written from their blocks, not built
        halves = tuple(block for half in (value if kind == layout.SWIGLU else (value,)) for block in layout.blocks(half))
        axis, first = int(experts), halves[0]
        shape = (*first.shape[:axis], sum(half.shape[axis] for half in halves), *first.shape[axis + 1:])
        key, lead, offset = self._key(index, name)
        if not lead or index == 0:
            self.writer.declare(key, first.dtype, (*lead, *shape))
        chunks = [((e,), tuple(half[e] for half in halves)) for e in range(shape[0])] if experts else [((), halves)]
        mine = self._mine(f"layer {index}")
        for expert, parts in chunks:
            self._submit(self.writer.write_chunk(key, parts, offset + expert + (0,) * parts[0].dim(), mine))

    def put_layer_value(self, index, stage, local, name, value):
        module = name.removesuffix("._extra_state")
        expert = re.search(r"local_experts\.([0-9]+)\.", module)
        if expert:
            module = module.replace(expert.group(0), "experts.")
        elif module.removeprefix(MTP_TRANSFORMER_LAYER) not in megatron_schema.DIST_EXTRA_STATE_MODULES:
            return
        key, lead, offset = self._key(index, module + "._extra_state")
        if expert:
            lead, offset = lead + (self.experts,), offset + (int(expert.group(1)),)
        shard = f"shard_{'.'.join(map(str, offset or (0,)))}_{'.'.join(map(str, lead or (1,)))}"
        name = f"{key}/{shard}"  # one string object for both entries: the pickled metadata shares it
        self._submit(self.writer.write_object(name, [value], self._mine(f"layer {index}")))

    def finish(self, args):
        """This rank's data file; common.pt and metadata.json from rank 0 (.metadata: finish_output)."""
        self.workers.finish()
        with output.writing(self.staged.path):
            pieces = self.writer.close()
            if self.share is None or self.share.rank == 0:
                torch_dist.write_common(self.staged.path, {
                    "args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": self.iteration,
                    "num_floating_point_operations_so_far": 0,
                    "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}})
        self._finished({"format": "torch_dist", "iteration": self.iteration, "dist": pieces})

    def abandon(self):
        try:
            self.workers.abandon()
        finally:
            self.writer.abandon()
            self.staged.abandon()


SINKS = {"torch": RankFilesSink, "torch_dist": TorchDistSink}  # by --ckpt-format
