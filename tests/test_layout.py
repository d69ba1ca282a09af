"""layout.Rows: TP shards sent as row blocks instead of one concatenated tensor. Every rule that takes
Rows must give exactly the rows it gives for the concatenated tensor, and a process whose saver has not
asked for Rows must receive the plain tensor."""

import torch
import torch.multiprocessing as mp

from converter_core import layout, vocab


def _rows(*row_counts, columns=6, dtype=torch.bfloat16):
    """Rows of blocks with these row counts, and the tensor they make."""
    whole = torch.randn(sum(row_counts), columns).to(dtype)
    blocks, start = [], 0
    for count in row_counts:
        blocks.append(whole[start:start + count].clone())  # separate storages, as TP shards are
        start += count
    return layout.Rows(blocks), whole


def _same(parts, expected):
    got = layout.assemble(tuple(parts))
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_rows_describe_the_tensor_they_make():
    rows, whole = _rows(4, 4)
    assert rows.shape == whole.shape and rows.dtype == whole.dtype and rows.dim() == 2
    assert rows.numel() * rows.element_size() == whole.nbytes
    assert rows.to(torch.bfloat16) is rows
    assert torch.equal(rows.to(torch.float32), whole.float())
    assert torch.equal(layout.tensor_of(rows), whole) and layout.tensor_of(whole) is whole


def test_row_rules_give_the_same_rows_for_rows_as_for_the_tensor():
    rows, whole = _rows(8, 8)
    for start, stop in ((0, 16), (0, 5), (3, 13), (8, 16), (15, 16), (16, 20)):
        _same(layout.row_blocks(rows, start, stop) or (whole[:0],), whole[start:stop])
    for tp in (1, 2, 4):
        for ours, theirs in zip(layout.shard_parts(rows, layout.COLUMN, tp),
                                layout.shard_parts(whole, layout.COLUMN, tp)):
            _same(ours, layout.assemble(theirs))
        w, w_whole = _rows(8, 8)
        v, v_whole = _rows(8, 8)
        for ours, theirs in zip(layout.shard_parts((w, v), layout.SWIGLU, tp),
                                layout.shard_parts((w_whole, v_whole), layout.SWIGLU, tp)):
            _same(ours, layout.assemble(theirs))
        for padded in (16, 20, 24):  # as is, padded by repeating the last row
            for ours, theirs in zip(layout.vocab_shard_parts(rows, padded, tp),
                                    layout.vocab_shard_parts(whole, padded, tp)):
                _same(ours, layout.assemble(theirs))
    _same(vocab.trim(rows, 11, "test"), whole[:11])
    _same(layout.concat_rows([rows, whole]), torch.cat([whole, whole]))


def test_qkv_split_from_tp_shards_equals_the_split_of_the_whole():
    heads, groups, head_dim, hidden = 8, 4, 2, 6
    for tp in (1, 2, 4):
        per_rank = groups // tp * (heads // groups + 2) * head_dim
        rows, whole = _rows(*[per_rank] * tp, columns=hidden)
        for ours, theirs in zip(layout.megatron_qkv_to_hf(rows, heads, groups, head_dim),
                                layout.megatron_qkv_to_hf(whole, heads, groups, head_dim)):
            _same(ours, layout.assemble(theirs))
        bias_rows, bias = layout.Rows(b[:, 0] for b in rows), whole[:, 0]
        for ours, theirs in zip(layout.megatron_qkv_to_hf(bias_rows, heads, groups, head_dim),
                                layout.megatron_qkv_to_hf(bias, heads, groups, head_dim)):
            _same(ours, layout.assemble(theirs))


def _receive(queue, results, accept):
    if accept:
        layout.accept_rows()
    value = queue.get()
    got = layout.assemble(tuple(value)) if isinstance(value, tuple) else value
    results.put((type(value).__name__, got.dtype, tuple(got.shape), got.view(torch.int16).numpy().tobytes()))


def test_rows_arrive_as_a_tensor_unless_the_receiver_takes_rows():
    rows, whole = _rows(3, 5)
    context = mp.get_context("fork")
    for accept, kind in ((False, "Tensor"), (True, "Rows")):
        queue, results = context.Queue(), context.Queue()
        process = context.Process(target=_receive, args=(queue, results, accept))
        process.start()
        queue.put(rows)
        got = results.get(timeout=60)  # plain values: a tensor's memory would go with the process
        process.join(60)
        assert process.exitcode == 0
        assert got == (kind, whole.dtype, tuple(whole.shape), whole.view(torch.int16).numpy().tobytes())
