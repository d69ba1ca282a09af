"""Tensor layout rules, each in one place: Megatron's grouped QKV, SwiGLU halves, tensor-parallel
split/merge, vocabulary padding. Messages carry full tensors; only savers split and only loaders merge.
"""

import math

import torch

# How a Megatron tensor is divided over tensor-parallel ranks.
COLUMN = "column"          # split along dim 0 (qkv, fc1 without SwiGLU, embeddings, output layer)
ROW = "row"                # split along dim 1 (linear_proj, fc2)
REPLICATED = "replicated"  # same on every rank (norms, row-parallel biases)
SWIGLU = "swiglu"          # fc1 with SwiGLU: rank r holds [W_r; V_r], not a slice of [W; V]


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
    per query group) whose concatenation is the HF tensor. Nothing is copied here: a writer gathers the
    blocks where it writes them (workers.contiguous), or assemble() makes the tensor."""
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *qkv.shape[1:])
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
    writer can assemble each shard where and when it writes it. For SWIGLU pass the pair (W, V)."""
    if kind == REPLICATED:
        return [(tensor,)] * tp
    if kind in (COLUMN, ROW):
        return [(t,) for t in torch.chunk(tensor, tp, dim=0 if kind == COLUMN else 1)]
    if kind == SWIGLU:
        w, v = tensor
        return list(zip(torch.chunk(w, tp), torch.chunk(v, tp)))
    raise ValueError(kind)


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
    """An uninitialised tensor in shared memory (share_memory_() would first copy the empty one there)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


def merge(shards, kind):
    """The full tensor from its tp shards (in shared memory); for SWIGLU returns the pair (W, V). One
    shard is returned as it is (views of it for SWIGLU): a view of a mapped source file crosses the
    queue as a reference (file_refs), with no copy at all."""
    if kind == REPLICATED:
        return shards[0]
    if len(shards) == 1:
        return tuple(torch.chunk(shards[0], 2, dim=0)) if kind == SWIGLU else shards[0]
    if kind == COLUMN:
        return cat_shared(shards, dim=0)
    if kind == ROW:
        return cat_shared(shards, dim=1)
    if kind == SWIGLU:  # built as [W; V] in one segment: a saver writing W and V together needs no gather
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        both = cat_shared([h[0] for h in halves] + [h[1] for h in halves])
        return tuple(torch.chunk(both, 2, dim=0))
    raise ValueError(kind)


def padded_vocab_size(vocab_size, divisible_by, tp):
    """Megatron's vocab_size_with_padding."""
    multiple = (divisible_by or 1) * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def vocab_shard_parts(table, rows, tp):
    """shard_parts of `table` trimmed or padded to `rows` (padding repeats the last row, as Megatron's saver
    does) and split over TP, without building the resized table: each rank's rows are a view of `table`,
    plus the repeated last row where its slice passes the end."""
    per_rank, parts = rows // tp, []
    for rank in range(tp):
        start, stop = rank * per_rank, (rank + 1) * per_rank
        kept = table[start:stop]
        padding = (table[-1:].expand(stop - max(start, table.shape[0]), *table.shape[1:]),) \
            if stop > table.shape[0] else ()
        parts.append(((kept,) if kept.shape[0] else ()) + padding)
    return parts
