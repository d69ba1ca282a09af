"""On our queue, a tensor that views a memory-mapped source file crosses as a reference to the file: the
receiving process maps the same bytes (only the pages that hold them) instead of reading a shared-memory
copy. Anything else travels the way torch sends it, and a source file replaced or cut short in the
meantime is refused in one line, never a crash (SIGBUS)."""

import errno
import mmap
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file

from converter_core import file_refs, workers
from converter_core.errors import ConversionError
from converter_core.formats import hf
from helpers import error_line, make_hf_model
from test_cli_and_plugins import plugin_env


def mapped_file(tensor):
    """The file whose mapping holds `tensor`'s bytes in this process, or None (anonymous or shared memory)."""
    mapping = mapping_of(tensor)
    return mapping[3] or None if mapping else None


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


def mapping_of(tensor):
    """(start, end, file offset, path) of the mapping that holds `tensor`'s bytes in this process."""
    pointer = tensor.untyped_storage().data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(end, 16) for end in fields[0].split("-"))
            if low <= pointer < high:
                return low, high, int(fields[2], 16), fields[5].strip() if len(fields) == 6 else ""
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="references need Linux's /proc/self/maps")
def test_a_received_tensor_maps_only_the_pages_that_hold_it(source):
    folder, weights = source
    path = (folder / "model.safetensors").resolve()
    padding = torch.zeros(5 * mmap.PAGESIZE, dtype=torch.bfloat16)  # stored before the table
    save_file({"a_padding": padding, **weights}, path, metadata={"format": "pt"})
    message = sent_through_queue(folder)
    at = path.read_bytes().index(raw(weights["table"]))
    assert at > 2 * mmap.PAGESIZE
    low, high, offset, mapped = mapping_of(message["table"])
    assert mapped == str(path)
    # From the page the tensor starts on to the page it ends on: not from the file's first byte, so the
    # address space needed does not grow with the file (ulimit -v; tests/test_address_space.py).
    assert offset == at - at % mmap.PAGESIZE
    assert high - low == -(-(at + message["table"].nbytes - offset) // mmap.PAGESIZE) * mmap.PAGESIZE
    assert message["table"].untyped_storage().data_ptr() == low + at - offset


def read_after_cut(folder, path, result):
    """In a child process with our writers (as our savers' are): receive the table, cut its source file
    short, then read the table's pages in this process (a copy, as a saver's gather does); report what
    happened."""
    workers.Workers(1)
    message = sent_through_queue(folder)
    os.truncate(path, 0)
    copied = message["table"].clone()  # without the handler, SIGBUS kills the process here
    try:
        file_refs.check_sources()
        result.put(("no error", copied.abs().sum().item()))
    except ConversionError as error:
        result.put(("refused", str(error)))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="references need Linux's /proc/self/maps")
def test_a_mapped_page_read_past_a_cut_files_end_is_refused_not_a_crash(source):
    folder, _ = source
    path = (folder / "model.safetensors").resolve()
    context = mp.get_context("fork")
    result = context.Queue()
    child = context.Process(target=read_after_cut, args=(folder, path, result))
    child.start()
    child.join(60)
    assert child.exitcode == 0, f"the reader died (exit status {child.exitcode}; -7 is SIGBUS)"
    assert result.get(timeout=5) == ("refused", f"{path}: the memory-mapped source file was cut short; it "
                                                "changed during the conversion")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="references need Linux's /proc/self/maps")
def test_received_pages_of_a_file_cut_short_are_not_written_from_memory(source, tmp_path, monkeypatch):
    folder, weights = source
    message = sent_through_queue(folder)
    path = (folder / "model.safetensors").resolve()
    os.truncate(path, 0)
    fd = os.open(tmp_path / "out.bin", os.O_RDWR | os.O_CREAT, 0o644)
    try:  # a column slice, written row by row where it lies; row blocks gathered first. Missing: the
        # bytes from the part's first element to its last (bf16)
        for parts, missing in ((message["table"][:, 2:6], (63 * 24 + 4) * 2), ((message["rows"],) * 2, 3 * 24 * 2)):
            with pytest.raises(ConversionError, match=f"^{path}: the file ended {missing} bytes early; it changed "
                                                      "during the conversion$"):
                workers.write_rows(fd, 0, parts)
    finally:
        os.close(fd)
    assert file_refs.file_range(message["rows"]) is not None  # still a reference: nothing was read


# Wraps one of our savers: when the message CUT_AT arrives (its tensors already received, so mapped),
# every source weight file is cut to nothing before the saver sees the message, as another tool
# rewriting the checkpoint in place would.
CUT_SAVER = '''
import glob, importlib, os

def add_arguments(parser):
    importlib.import_module("converter_plugins.saver_" + os.environ["CUT_SAVER"]).add_arguments(parser)

class Cut:
    def __init__(self, queue, sources):
        self.queue, self.sources = queue, sources
    def get(self, *a, **k):
        value = self.queue.get(*a, **k)
        if isinstance(value, dict) and value.get("name") == os.environ["CUT_AT"]:
            for path in self.sources:
                os.truncate(path, 0)
        return value

def save_checkpoint(queue, args):
    sources = [path for pattern in ("*.safetensors", "*/*/*.pt")
               for path in glob.glob(os.path.join(args.load_dir, "**", pattern), recursive=True)]
    assert sources
    saver = importlib.import_module("converter_plugins.saver_" + os.environ["CUT_SAVER"])
    saver.save_checkpoint(Cut(queue, sources), args)
'''


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="references need Linux's /proc/self/maps")
@pytest.mark.parametrize("saver,at", [("mcore", "transformer layer 0"), ("mcore", "embeddings"),
                                      ("llama_hf", "transformer layer 1")])
def test_a_source_cut_short_during_the_conversion_is_one_line_naming_it(tmp_path, saver, at):
    """The saver reads pages of received tensors (the zip writer's first bytes of a record, gathers,
    column slices); past the cut file's end each read used to kill it with SIGBUS ("saver was killed
    by signal 7")."""
    model = tmp_path / "hf"
    make_hf_model(model, "llama", torch.bfloat16)
    source = model
    if saver == "llama_hf":  # from Megatron rank files, TP 2 x PP 2
        source = tmp_path / "mcore"
        subprocess.run([sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", "llama_hf",
                        "--saver", "mcore", "--load-dir", model, "--save-dir", source, "--quiet",
                        "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"], check=True)
    env = dict(plugin_env(tmp_path, saver_cut=CUT_SAVER), CUT_SAVER=saver, CUT_AT=at)
    target = tmp_path / "out"
    loader = "llama_hf" if saver == "mcore" else "mcore"
    process = subprocess.run([sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", loader,
                              "--saver", "cut", "--load-dir", source, "--save-dir", target,
                              "--target-tensor-parallel-size", "2"][:-2 if saver == "llama_hf" else None],
                             capture_output=True, text=True, timeout=120, env=env)
    line = error_line(process)
    assert process.returncode == 1, process.stderr
    assert "signal" not in line and "unexpected" not in line, line
    cut = sorted(str(path.resolve()) for pattern in ("*.safetensors", "*/*/*.pt") for path in source.glob(pattern))
    assert any(line.startswith(f"converter_core: error: saver failed: {path}: ") for path in cut), line
    assert line.endswith("; it changed during the conversion"), line
    assert not target.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]
