"""The Megatron loader of per-rank torch checkpoints (Megatron-Core or legacy GPT): every rank file is
memory-mapped, and a layer's TP and EP shards are merged only when that layer is sent. A torch_dist
folder goes to load_dist."""

import argparse
import re

import torch

from converter_core import layout, protocol, share as sharing
from converter_core.errors import ConversionError, require
from converter_core.formats import rank_files, torch_dist, torch_file
from converter_core.megatron import args as megatron_args, schema as megatron_schema
from converter_core.megatron.load_dist import load_dist
from converter_core.megatron.load_flags import source_metadata
from converter_core.megatron.schema import final_norm_keys, part_rows


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
    whole_experts = tp > 1 and getattr(margs, "expert_tensor_parallel_size", None) == 1  # on every TP rank
    require(getattr(margs, "expert_tensor_parallel_size", None) in (None, 1, tp) or not experts,
            f"{first}: expert tensor parallel size {margs.expert_tensor_parallel_size} differs from TP {tp}; "
            "not supported")
    paths = rank_files.find_rank_files(folder, tp, pp, ep, whole_experts)
    dense_file, expert_files = rank_files.holders(tp, ep, whole_experts)
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

    def tensor(t, p, e, chunk, path, shape=None):
        """The tensor at `path` of rank file (t, p, e), which must have `shape` (None: any size along that axis)."""
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
    md = source_metadata(margs, args, iteration, tp, pp)
    protocol.check_mtp_reader(args, md, str(first))
    mtp_layers = megatron_args.mtp_layers(margs)

    def merged(p, chunk, path, kind, full, old_qkv=False, files=None, parts=None):
        """The TP shards of `path` merged (layout.merge), each first checked against the shard shape that
        the tensor's full shape `full` (SwiGLU: one half's) implies: a shard of the wrong shape would
        otherwise be written into its neighbours' rows or columns. `files`: the (TP rank, EP rank) of each
        shard's file (rank_files.holders); the dense shards' unless given. `parts`: the rows of each part
        of a fused parameter (schema.part_rows)."""
        files = files or [dense_file(t) for t in range(tp)]
        want = layout.shard_shape(full, kind, len(files), parts)
        if None in want:  # the vocabulary's padded rows: every rank has the first's
            want = tuple(tensor(files[0][0], p, files[0][1], chunk, path).shape[0] if w is None else w for w in want)
        shards = [tensor(t, p, e, chunk, path, want) for t, e in files]
        if old_qkv:
            shards = [_old_qkv_to_grouped(s, version, heads_per_rank) for s in shards]
        return layout.merge(shards, kind, parts)

    def stacked(p, chunk, index, local, entry):
        """One tensor (or SwiGLU pair) per expert, gathered over the EP ranks, stacked in expert order."""
        full = protocol.layer_message_shapes(margs, index)[entry.keys[0]][1:]  # one expert's
        parts = [merged(p, chunk, schema.layer_path(margs.num_layers, index, local, entry.name.format(j)), entry.kind,
                        full, files=expert_files(e)) for e in range(ep) for j in range(experts // ep)]
        if entry.kind == layout.SWIGLU:
            return tuple(torch.stack([layout.tensor_of(part[half]) for part in parts]) for half in range(len(entry.keys)))
        return torch.stack([layout.tensor_of(part) for part in parts])

    def layer_message(index, p, chunk, local):
        """Layer `index` (`local` in its stage's `chunk` on pipeline rank `p`; num_layers + i: MTP layer i)."""
        name = protocol.layer_name(index) if index < margs.num_layers else protocol.mtp_layer_name(index - margs.num_layers)
        if sharing.skipped(args, name):  # no file of this rank's saver holds it: no shard read or merged
            return protocol.placeholder(margs, index, md.params_dtype)
        message, layer_shapes = {}, protocol.layer_message_shapes(margs, index)
        for entry in schema.entries(margs, index):
            path = schema.layer_path(margs.num_layers, index, local, entry.name)
            if entry.experts:
                value = stacked(p, chunk, index, local, entry)
            else:
                value = merged(p, chunk, path, entry.kind, layer_shapes[entry.keys[0]],
                               old_qkv=version < 2.0 and "qkv" in entry.keys[0], parts=part_rows(entry, layer_shapes))
            for key, part in zip(entry.keys, value if entry.kind == layout.SWIGLU else (value,), strict=True):
                require(tuple(part.shape) == layer_shapes[key],
                        f"{paths[0, p, 0]}: {'.'.join(path)} gives {key!r} of shape {list(part.shape)}, "
                        f"the args imply {list(layer_shapes[key])}")
                message[key] = part
        return message

    def messages():
        table = merged(0, chunks[0], schema.word_embeddings, layout.COLUMN, (None, margs.hidden_size))
        yield protocol.EMBEDDINGS, {"word embeddings": table}
        for index, (p, chunk, local) in enumerate(order):
            yield protocol.layer_name(index), layer_message(index, p, chunk, local)
        p, chunk = pp - 1, chunks[-1]
        yield protocol.FINAL_NORM, {key: merged(p, chunk, schema.final_norm(key), layout.REPLICATED, (margs.hidden_size,))
                                    for key in final_norm_keys(margs)}
        if md.output_layer:
            weight = merged(p, chunk, schema.output_layer, layout.COLUMN, (None, margs.hidden_size))
            require(weight.shape == table.shape,
                    f"{paths[0, p, 0]}: output layer shape {list(weight.shape)} differs from the embeddings {list(table.shape)}")
            yield protocol.OUTPUT_LAYER, {"weight": weight}
        for depth in range(mtp_layers):  # megatron-core keeps them on the last stage
            yield protocol.mtp_layer_name(depth), layer_message(margs.num_layers + depth, p, chunk, None)

    protocol.send_model(queue, md, messages(), protocol.stall_timeout(args), protocol.saver_takes_rows(args))


def _tensor_paths(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _tensor_paths(value, prefix + (key,))
        elif torch.is_tensor(value):
            yield prefix + (key,)


def _check_nothing_left_out(models, paths, schema, order, margs, local_experts):
    """Every tensor of every rank file is one this converter carries: a parameter it does not know
    (an expert bias, multi-token prediction, ...) is refused rather than dropped."""
    layers = {}  # (pp rank, chunk) -> {local index: global index}; MTP layers under no local index
    for index, (p, chunk, local) in enumerate(order):
        layers.setdefault((p, chunk), {})[local] = index
    last = order[-1][:2] if order else None  # the last pipeline rank's last chunk
    for depth in range(megatron_args.mtp_layers(margs)):
        layers.setdefault(last, {})[("mtp", depth)] = margs.num_layers + depth
    for (t, p, e, chunk), model in models.items():
        known = {schema.word_embeddings, schema.output_layer, schema.tied_output_layer}
        known |= {schema.final_norm(key) for key in final_norm_keys(margs)}
        for local, index in layers.get((p, chunk), {}).items():
            for entry in schema.entries(margs, index):
                names = [entry.name.format(j) for j in range(local_experts)] if entry.experts else [entry.name]
                known |= {schema.layer_path(margs.num_layers, index, local, name) for name in names}
        for path in _tensor_paths(model):
            require(path in known or path[-1].endswith("_extra_state"),
                    f"{paths[t, p, e]}: holds {'.'.join(path)}, a parameter this converter does not carry")
