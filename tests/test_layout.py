"""layout.Rows and layout.Columns: TP shards sent as row or column blocks instead of one concatenated
tensor. Every rule that takes them must give exactly what it gives for the concatenated tensor, our
writers must write the same bytes, and a saver that has not asked for them must receive the plain tensor."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from converter_core import layout, protocol, vocab, workers


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


def _columns(*column_counts, rows=5, dtype=torch.bfloat16):
    """Columns of blocks with these column counts, and the tensor they make."""
    whole = torch.randn(rows, sum(column_counts)).to(dtype)
    starts = [sum(column_counts[:i]) for i in range(len(column_counts) + 1)]
    return layout.Columns(whole[:, a:b].clone() for a, b in zip(starts, starts[1:])), whole


def _written(tmp_path, parts):
    """The bytes workers.write_rows writes for `parts`, between a header and a trailer."""
    fd = os.open(tmp_path / "written", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        size = workers.write_rows(fd, 3, parts, b"<<", b">>")
        return os.pread(fd, size + 3, 0)
    finally:
        os.close(fd)


def test_columns_give_the_same_shards_and_bytes_as_the_tensor(tmp_path):
    columns, whole = _columns(8, 8)
    assert columns.shape == whole.shape and columns.dtype == whole.dtype and columns.dim() == 2
    assert columns.numel() * columns.element_size() == whole.nbytes
    assert columns.to(torch.bfloat16) is columns and torch.equal(columns.to(torch.float32), whole.float())
    assert torch.equal(layout.tensor_of(columns), whole)
    expected = lambda tensor: b"\0\0\0<<" + tensor.contiguous().view(torch.int16).numpy().tobytes() + b">>"  # noqa: E731
    assert _written(tmp_path, columns) == expected(whole)
    for shards in ((8, 8), (4, 4, 4, 4), (16,)):  # from TP 2, 4 and 1 sources
        columns, whole = _columns(*shards)
        for tp in (1, 2, 4):
            for ours, theirs in zip(layout.shard_parts(columns, layout.ROW, tp), layout.shard_parts(whole, layout.ROW, tp)):
                assert torch.equal(layout.tensor_of(ours[0]), theirs[0])
                assert _written(tmp_path, ours) == expected(theirs[0])  # a column slice, or Columns of several
    rows, _ = _rows(3, 4)
    sliced = torch.randn(2, 9).to(torch.bfloat16)[:, 1:7]  # contiguous rows: written row by row
    transposed = torch.randn(6, 4).to(torch.bfloat16).t()  # rows not contiguous: gathered first
    for parts in ((rows[0], sliced), (rows[0], transposed, sliced)):
        assert _written(tmp_path, parts) == expected(torch.cat(parts))


def _receive(queue, results, receiver_takes):
    """A saver's process: reads a message as Megatron's savers do (queue.get), or with our Receiver."""
    if receiver_takes is None:
        value = queue.get()["w"]
    else:
        value = protocol.Receiver(queue, checking=False, rows=receiver_takes).get("m")["w"]
    got = layout.tensor_of(value)
    results.put((type(value).__name__, got.dtype, tuple(got.shape), got.view(torch.int16).numpy().tobytes()))


@pytest.mark.parametrize("blocks,kind", [(_rows, "Rows"), (_columns, "Columns")])
def test_blocks_arrive_as_a_tensor_unless_the_saver_takes_rows(blocks, kind):
    """Sent for a saver that has not declared takes_rows, blocks arrive as the tensor (concatenated on
    arrival), whoever reads them; declared, they arrive as they were sent, and a Receiver that does not
    take them (rows=False) still hands its saver the tensor."""
    value, whole = blocks(3, 5)
    context = mp.get_context("fork")
    for sent_as_rows, receiver_takes, expected in ((False, None, "Tensor"), (False, True, "Tensor"),
                                                   (True, None, kind), (True, True, kind), (True, False, "Tensor")):
        queue, results = context.Queue(), context.Queue()
        process = context.Process(target=_receive, args=(queue, results, receiver_takes))
        process.start()
        protocol.send(queue, "m", {"w": value}, rows=sent_as_rows)
        got = results.get(timeout=60)  # plain values: a tensor's memory would go with the process
        process.join(60)
        assert process.exitcode == 0
        assert got == (expected, whole.dtype, tuple(whole.shape), whole.view(torch.int16).numpy().tobytes())
