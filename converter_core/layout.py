"""Tensor layout rules, each in one place: Megatron's grouped QKV, SwiGLU halves, tensor-parallel
split/merge, vocabulary padding. Messages carry full tensors (or Rows and Columns, views whose rows or
columns make one); only savers split and only loaders merge.
"""

import math

import torch

from converter_core import dry_run
from converter_core.errors import ConversionError

# How a Megatron tensor is divided over tensor-parallel ranks.
COLUMN = "column"          # split along dim 0 (qkv, fc1 without SwiGLU, embeddings, output layer)
ROW = "row"                # split along dim 1 (linear_proj, fc2)
REPLICATED = "replicated"  # same on every rank (norms, row-parallel biases)
SWIGLU = "swiglu"          # parts on one parameter (SwiGLU's fc1): rank r holds [W_r; V_r], not a slice of [W; V]


class Rows(tuple):
    """A tensor given as row blocks, views whose concatenation it is. A Megatron loader sends TP shards
    merged along rows this way instead of copying them into fresh shared memory: the blocks view its
    mapped rank files, so they cross the queue as file references (file_refs), and our savers write them
    where they lie. A saver that has not declared it takes them (protocol.takes_rows: Megatron's own
    savers, a plugin's own use of the Receiver) receives the plain tensor, concatenated as it arrives
    (joined_on_arrival, applied by protocol.send)."""

    @property
    def shape(self):
        return torch.Size(rows_shape(self))

    @property
    def dtype(self):
        return self[0].dtype

    def dim(self):
        return self[0].dim()

    def numel(self):
        return math.prod(self.shape)

    def element_size(self):
        return self[0].element_size()

    def to(self, dtype):
        return self if dtype == self.dtype else assemble(self).to(dtype)

    def __reduce__(self):
        return _received_rows, (tuple(self),)


class Columns:
    """A 2-D tensor given as column blocks, views whose concatenation along columns it is: TP shards of a
    row-parallel weight (linear_proj, fc2), sent by a Megatron loader as Rows are, for the same reason.
    Our writers write it row by row from the blocks (workers.write_rows); code that needs a tensor
    calls tensor_of. Received as the concatenated tensor where Rows would be."""

    def __init__(self, blocks):
        self.blocks = tuple(blocks)

    @property
    def shape(self):
        return torch.Size((self.blocks[0].shape[0], sum(block.shape[1] for block in self.blocks)))

    @property
    def dtype(self):
        return self.blocks[0].dtype

    def dim(self):
        return 2

    def numel(self):
        return math.prod(self.shape)

    def element_size(self):
        return self.blocks[0].element_size()

    def to(self, dtype):
        return self if dtype == self.dtype else tensor_of(self).to(dtype)

    def __reduce__(self):
        return _received_columns, (self.blocks,)


def _received_rows(blocks):
    _check_blocks(blocks, 1, "row")
    return Rows(blocks)


def _received_columns(blocks):
    _check_blocks(blocks, 0, "column")
    return Columns(blocks)


class _JoinedOnArrival:
    """Blocks that unpickle as the one tensor they make along `dim` (see joined_on_arrival)."""

    def __init__(self, blocks, dim):
        self.blocks, self.dim = blocks, dim

    def __reduce__(self):
        return _joined, (self.blocks, self.dim)


def _joined(blocks, dim):
    _check_blocks(blocks, 1 - dim, "column" if dim else "row")
    return torch.cat(blocks, dim=dim)


def joined_on_arrival(value):
    """`value` as it should cross a queue to a process that takes only tensors: Rows and Columns are
    concatenated there, as they are unpickled, from the blocks' file references (concatenated here they
    would fill fresh shared memory first); anything else is left as it is."""
    if isinstance(value, Rows):
        return _JoinedOnArrival(tuple(value), 0)
    if isinstance(value, Columns):
        return _JoinedOnArrival(value.blocks, 1)
    return value


def _check_blocks(blocks, keep, what):
    """Blocks make one tensor only if they agree on every other axis (the shape check of the whole
    message sees the first block's); refused rather than written into each other."""
    shapes = {tuple(block.shape[keep:]) if keep else (tuple(block.shape[:1]), block.dim()) for block in blocks}
    if len(shapes) > 1:
        raise ConversionError(f"a message tensor sent as {what} blocks of different shapes "
                              f"{[list(block.shape) for block in blocks]}")


def blocks(value):
    """The row blocks of a tensor (itself) or of Rows."""
    return tuple(value) if isinstance(value, Rows) else (value,)


def tensor_of(value):
    """A tensor for code that needs one: Rows and Columns are concatenated, a tensor is returned as it is."""
    if isinstance(value, Columns):
        return torch.cat(value.blocks, dim=1)
    return assemble(value) if isinstance(value, Rows) else value


def row_blocks(value, start, stop):
    """Views of rows [start, stop) of a tensor or of Rows, one for each block they touch."""
    return _slices(blocks(value), start, stop, 0)


def _slices(pieces, start, stop, dim):
    """Views of [start, stop) along `dim` of the tensor that `pieces` make when concatenated along it,
    one for each piece they touch."""
    views, offset = [], 0
    for piece in pieces:
        low, high = max(start - offset, 0), min(stop - offset, piece.shape[dim])
        if low < high:
            views.append(piece.narrow(dim, low, high - low))
        offset += piece.shape[dim]
    return tuple(views)


def concat_rows(values):
    """The rows of `values` one after another: Rows (nothing copied) if any of them is Rows, else torch.cat."""
    if any(isinstance(value, Rows) for value in values):
        return Rows(block for value in values for block in blocks(value))
    return torch.cat(values)


def hf_qkv_to_megatron(q, k, v, num_heads, num_groups, head_dim):
    """Interleave HF q/k/v (weights or biases) into Megatron's per-query-group [q..., k, v] rows."""
    per_group = num_heads // num_groups
    tail = q.shape[1:]
    grouped = cat_shared([q.reshape(num_groups, per_group * head_dim, *tail),
                          k.reshape(num_groups, head_dim, *tail),
                          v.reshape(num_groups, head_dim, *tail)], dim=1)
    return grouped.reshape(-1, *tail)


def megatron_qkv_to_hf(qkv, num_heads, num_groups, head_dim):
    """Inverse of hf_qkv_to_megatron: returns (q, k, v), each a tuple of row blocks (views of `qkv`, one
    per query group) whose concatenation is the HF tensor. Nothing is copied here: a writer writes the
    blocks where they lie (workers.write_rows), or assemble() makes the tensor."""
    per_group = num_heads // num_groups
    group_rows = (per_group + 2) * head_dim
    if isinstance(qkv, Rows) and not any(block.shape[0] % group_rows for block in qkv):  # TP shards: whole groups
        per_block = [megatron_qkv_to_hf(block, block.shape[0] // group_rows * per_group, block.shape[0] // group_rows,
                                        head_dim) for block in qkv]
        return tuple(sum((split[i] for split in per_block), ()) for i in range(3))
    qkv = tensor_of(qkv)
    grouped = qkv.reshape(num_groups, group_rows, *qkv.shape[1:])
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return tuple(q), tuple(k), tuple(v)


def interleave_rope_rows(tensor, block, rope, inverse=False):
    """Reorder the last `rope` rows of every `block`-row block from halves (x_0..x_{d/2-1}, x_{d/2}..)
    to interleaved pairs (x_0, x_{d/2}, x_1, ...), or back with `inverse`."""
    tail = tensor.shape[1:]
    blocks = tensor.reshape(-1, block, *tail)
    kept, rows = blocks[:, : block - rope], blocks[:, block - rope:]
    order = (2, rope // 2) if not inverse else (rope // 2, 2)
    rows = rows.reshape(rows.shape[0], *order, *tail).transpose(1, 2).reshape(rows.shape[0], rope, *tail)
    return torch.cat([kept, rows], dim=1).reshape(tensor.shape)


def shard_parts(tensor, kind, tp):
    """Per TP rank, the views whose rows make its shard (SwiGLU: [W_r; V_r]); nothing is copied, so a
    writer can assemble each shard where and when it writes it. For SWIGLU pass the parts ((W, V), or the
    several parts of a fused projection such as Megatron-Core's gated DeltaNet in_proj)."""
    if kind == REPLICATED:
        return [blocks(tensor)] * tp
    if kind == COLUMN:
        return _split_rows(tensor, tp)
    if kind == ROW:
        return [(column_slice(tensor, rank * tensor.shape[1] // tp, (rank + 1) * tensor.shape[1] // tp),)
                for rank in range(tp)]
    if kind == SWIGLU:
        return [sum(rows, ()) for rows in zip(*(_split_rows(part, tp) for part in tensor))]
    raise ValueError(kind)


def _split_rows(value, tp):
    """Per TP rank, the row blocks of its equal slice of a tensor or of Rows."""
    if not isinstance(value, Rows):
        return [(t,) for t in torch.chunk(value, tp)]
    per_rank = value.shape[0] // tp
    return [row_blocks(value, rank * per_rank, (rank + 1) * per_rank) for rank in range(tp)]


def column_slice(value, start, stop):
    """Columns [start, stop) of a 2-D tensor or of Columns, as views: one, or Columns of several."""
    if not isinstance(value, Columns):
        return value[:, start:stop]
    views = _slices(value.blocks, start, stop, 1)
    return views[0] if len(views) == 1 else Columns(views)


def rows_shape(parts):
    """The shape of assemble(parts) (a tuple of tensors whose rows are concatenated), without building it."""
    if len(parts) == 1:
        return tuple(parts[0].shape)
    return (sum(part.shape[0] for part in parts), *parts[0].shape[1:])


def assemble(parts):
    """One contiguous tensor from shard_parts' views."""
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def cat_shared(tensors, dim=0):
    """torch.cat into shared memory. Loaders build their messages this way: the queue sends a shared
    tensor as it is, instead of copying a private one into shared memory (one pass and one copy of
    the largest tensors fewer)."""
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.cat(tensors, dim=dim, out=empty_shared(shape, tensors[0].dtype))


def empty_shared(shape, dtype):
    """An uninitialised tensor in shared memory (share_memory_() would first copy the empty one there); in a
    dry run a meta tensor, since what fills it has no data either."""
    if dry_run.active():
        return dry_run.meta(shape, dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def shard_shape(full, kind, tp, parts=None):
    """The shape of each TP rank's shard of a tensor of shape `full` (SWIGLU: of one half, W or V; the
    shard is [W_r; V_r]; `parts`: the row counts of its parts when they are not two equal halves). None
    (a size not known in advance) stays None."""
    def split(size):
        return None if size is None else size // tp
    if kind == REPLICATED:
        return tuple(full)
    if kind == COLUMN:
        return (split(full[0]), *full[1:])
    if kind == ROW:
        return (full[0], split(full[1]), *full[2:])
    if kind == SWIGLU:
        return (None if full[0] is None else sum(size // tp for size in parts or (full[0], full[0])), *full[1:])
    raise ValueError(kind)


def merge(shards, kind, parts=None):
    """The full tensor from its tp shards; for SWIGLU returns the pair (W, V) (or the parts whose full row
    counts are `parts`, when they are not two equal halves). Shards are returned as Rows
    or Columns of them and one shard as it is (views of it for SWIGLU), so nothing is copied: a view of a
    mapped source file crosses the queue as a reference (file_refs)."""
    if kind == REPLICATED:
        return shards[0]
    if kind == SWIGLU:
        sizes = [size // len(shards) for size in parts] if parts else [shards[0].shape[0] // 2] * 2
        split = [torch.split(shard, sizes) for shard in shards]
        return tuple(split[0]) if len(shards) == 1 else tuple(Rows(pieces) for pieces in zip(*split))
    if len(shards) == 1:
        return shards[0]
    if kind == COLUMN:
        return Rows(shards)
    if kind == ROW:
        return Columns(shards)
    raise ValueError(kind)


def padded_vocab_size(vocab_size, divisible_by, tp):
    """Megatron's vocab_size_with_padding."""
    multiple = (divisible_by or 1) * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def vocab_shard_parts(table, rows, tp):
    """shard_parts of `table` (a tensor or Rows) trimmed or padded to `rows` (padding repeats the last
    row, as Megatron's saver does) and split over TP, without building the resized table: each rank's rows
    are views of `table`, plus the repeated last row where its slice passes the end."""
    per_rank, parts, count = rows // tp, [], table.shape[0]
    last = row_blocks(table, count - 1, count)[0]
    for rank in range(tp):
        start, stop = rank * per_rank, (rank + 1) * per_rank
        padding = (last.expand(stop - max(start, count), *table.shape[1:]),) if stop > count else ()
        parts.append(row_blocks(table, start, stop) + padding)
    return parts
