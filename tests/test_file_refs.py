"""On our queue, a tensor that views a memory-mapped source file crosses as a reference to the file: the
receiving process maps the same bytes instead of reading a shared-memory copy. Anything else travels
the way torch sends it, and a source file replaced in the meantime is refused in one line."""

import errno
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from converter_core import file_refs, workers
from converter_core.errors import ConversionError
from converter_core.formats import hf


def mapped_file(tensor):
    """The file whose mapping holds `tensor`'s bytes in this process, or None (anonymous or shared memory)."""
    pointer = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(end, 16) for end in fields[0].split("-"))
            if low <= pointer < high:
                return fields[5].strip() if len(fields) == 6 else None
    return None


def send_weights(folder, queue, received):
    file_refs.send_by_reference()
    weights = hf.HFWeights(folder)
    table = weights.get("table")
    queue.put({"table": table, "rows": table[2:5], "column": table[:, 1], "computed": table * 2})
    received.wait(60)  # torch's shared-memory handles need their sender until they are opened


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    weights = {"table": torch.randn(64, 24, dtype=torch.float32).to(torch.bfloat16), "norm": torch.randn(24)}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return tmp_path, weights


def sent_through_queue(folder, before_receiving=lambda: None):
    context = mp.get_context("fork")
    queue, received = context.Queue(), context.Event()
    sender = context.Process(target=send_weights, args=(folder, queue, received))
    sender.start()
    try:
        queue._poll(60)  # the message is pickled (and its references taken) before it is readable
        before_receiving()
        return queue.get(timeout=60)
    finally:
        received.set()
        sender.join(60)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="references need Linux's /proc/self/maps")
def test_source_views_arrive_mapped_from_the_source_file(source):
    folder, weights = source
    message = sent_through_queue(folder)
    path = str((folder / "model.safetensors").resolve())
    for key, expected in (("table", weights["table"]), ("rows", weights["table"][2:5]),
                          ("column", weights["table"][:, 1])):
        assert torch.equal(message[key], expected) and message[key].dtype == torch.bfloat16
        assert mapped_file(message[key]) == path, key  # the file's own pages, not a copy
    assert message["column"].stride() == (24,)
    assert torch.equal(message["computed"], weights["table"] * 2)
    assert message["computed"].is_shared() and mapped_file(message["computed"]) != path


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="references need Linux's /proc/self/maps")
def test_a_source_replaced_before_it_is_read_is_refused(source):
    folder, weights = source
    path = folder / "model.safetensors"

    def replace():
        save_file({"table": torch.zeros(64, 24, dtype=torch.bfloat16)}, folder / "new.safetensors")
        os.replace(folder / "new.safetensors", path)

    with pytest.raises(ConversionError, match=f"^{path}: the source file was replaced during the conversion$"):
        sent_through_queue(folder, replace)


def written_with(received, tmp_path, copy_file_range=None, monkeypatch=None):
    """Bytes of a file that workers.write_all wrote `received` into, between a header and a trailer, at
    an offset; and the calls made to copy_file_range."""
    calls = []
    real = os.copy_file_range

    def counted(*args):
        calls.append(args)
        return (copy_file_range or real)(*args)

    monkeypatch.setattr(os, "copy_file_range", counted)
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert workers.write_all(fd, [b"head", received, b"tail"], 3) == 8 + received.nbytes
    finally:
        os.close(fd)
    return (tmp_path / "out.bin").read_bytes(), calls


def raw(tensor):
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="copy_file_range is Linux's")
def test_received_views_are_copied_from_the_source_file_by_the_kernel(source, tmp_path, monkeypatch):
    folder, weights = source
    message = sent_through_queue(folder)
    data = (folder / "model.safetensors").read_bytes()
    rows_at = data.index(raw(weights["table"][2:5]))
    assert file_refs.file_range(message["rows"])[1:] == (rows_at, str((folder / "model.safetensors").resolve()))
    assert file_refs.file_range(message["column"]) is None  # not contiguous: written from memory, row by row
    assert file_refs.file_range(message["computed"]) is None  # shared memory, not a source file
    assert file_refs.file_range(weights["table"][2:5]) is None  # never received
    output, calls = written_with(message["rows"], tmp_path, monkeypatch=monkeypatch)
    assert output == b"\0" * 3 + b"head" + raw(weights["table"][2:5]) + b"tail"
    assert [call[2:] for call in calls] == [(message["rows"].nbytes, rows_at, 7)]


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="copy_file_range is Linux's")
def test_where_the_kernel_cannot_copy_the_bytes_are_written_from_memory(source, tmp_path, monkeypatch):
    folder, weights = source
    message = sent_through_queue(folder)

    def refused(*args):
        raise OSError(errno.EXDEV, "Invalid cross-device link")  # e.g. the output is on another filesystem

    output, calls = written_with(message["table"], tmp_path, refused, monkeypatch)
    assert output == b"\0" * 3 + b"head" + raw(weights["table"]) + b"tail" and len(calls) == 1


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="copy_file_range is Linux's")
def test_a_source_cut_short_while_it_is_copied_is_refused(source, tmp_path, monkeypatch):
    folder, weights = source
    message = sent_through_queue(folder)
    path = folder / "model.safetensors"
    os.truncate(path, file_refs.file_range(message["rows"])[1] + 10)  # the mapping is not read again
    missing = message["rows"].nbytes - 10  # 3 rows of 24 bf16 values, 10 bytes of them still there
    with pytest.raises(ConversionError, match=f"^{path.resolve()}: the file ended {missing} bytes early; it "
                                              "changed during the conversion$"):
        written_with(message["rows"], tmp_path, monkeypatch=monkeypatch)
