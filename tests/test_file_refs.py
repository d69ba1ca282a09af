"""On our queue, a tensor that views a memory-mapped source file crosses as a reference to the file: the
receiving process maps the same bytes instead of reading a shared-memory copy. Anything else travels
the way torch sends it, and a source file replaced in the meantime is refused in one line."""

import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from converter_core import file_refs
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
