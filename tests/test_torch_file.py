"""Our torch.save archives are laid out ahead of their bytes (so any thread may write any record), yet
are byte for byte what torch's own writer writes (without the CRC32s, which we do not compute): a
torch_dist chunk equals torch.save of the tensor into a file object, however its rows arrive; a rank
file equals torch's writer given the same records, zip64 fields included."""

import io
import os

import torch
from torch.utils.serialization import config

from converter_core.formats import torch_file


def torch_save_bytes(tensor):
    buffer = io.BytesIO()
    config.save.compute_crc32 = False
    try:
        torch.save(tensor, buffer)
    finally:
        config.save.compute_crc32 = True
    return buffer.getvalue()


def test_chunks_from_parts_are_torch_save_bytes(tmp_path):
    torch.manual_seed(0)
    w, v = torch.randn(48, 16).to(torch.bfloat16), torch.randn(40, 16).to(torch.bfloat16)
    table = torch.randn(16, 96)
    cases = [
        ((w, v), (88, 16)),                      # contiguous row blocks: written from the placeholder
        ((w, v), (1, 88, 16)),                   # with a leading axis of size 1 (an expert's offset)
        ((table[:, :32], table[:, 64:]), (32, 32)),  # column slices: gathered, then written
        (w, (48, 16)),                           # one tensor
    ]
    fd = os.open(tmp_path / "data", os.O_WRONLY | os.O_CREAT)
    os.write(fd, b"header")  # chunks start wherever the previous one ended
    starts, jobs = [len(b"header")], []
    for parts, shape in cases:
        length, job = torch_file.StreamingTorchFile(tmp_path / "data", fd, starts[-1]).save_tensor(parts, shape)
        starts.append(starts[-1] + length)
        jobs.append(job)
    for job in reversed(jobs):  # each chunk's place is fixed: any order writes the same file
        job()
    os.close(fd)
    written = (tmp_path / "data").read_bytes()
    assert len(written) == starts[-1] and written[:6] == b"header"
    for (parts, shape), start, stop in zip(cases, starts, starts[1:]):
        whole = torch.cat(parts) if isinstance(parts, tuple) else parts
        assert written[start:stop] == torch_save_bytes(whole.reshape(shape)), shape
        assert torch.equal(torch.load(io.BytesIO(written[start:stop])), whole.reshape(shape))


def torch_writer_rewrite(path, out):
    """The records of archive `path`, in its order, written through torch's own writer into `out` (which
    adds the version and serialization id records itself)."""
    reader = torch._C.PyTorchFileReader(str(path))
    writer = torch._C.PyTorchFileWriter(str(out), False, torch.serialization._get_storage_alignment())
    for name in reader.get_all_records():
        if name not in ("version", ".data/serialization_id"):
            data = reader.get_record(name)
            writer.write_record(name, data, len(data))
    writer.write_end_of_file()


def test_rank_file_is_torch_writers_bytes(tmp_path):
    torch.manual_seed(0)
    grid = torch.randn(8, 8)
    state = {"bf16": torch.randn(30, 16).to(torch.bfloat16), "vector": torch.randn(7), "empty": torch.zeros(0),
             "one": torch.tensor([1.5]), "columns": grid[:, 2:5], "column": grid[:, 0], "transposed": grid[:3].t(),
             # data that begins like a zip data descriptor, which torch's serialization id notices
             "descriptor_like": torch.tensor([0x08074B50, 7], dtype=torch.int32)}
    archive = torch_file.StreamingTorchFile(tmp_path / "model_optim_rng.pt")
    jobs = []
    model = {name: archive.tensor(tensor, lambda key, job: jobs.append(job)) for name, tensor in state.items()}
    model["rows"] = archive.tensor((state["bf16"][:3], state["bf16"][5:9]), lambda key, job: jobs.append(job))
    for job in reversed(jobs):
        job()
    archive.close({"model": model, "iteration": 3})
    (tmp_path / "torch").mkdir()
    torch_writer_rewrite(tmp_path / "model_optim_rng.pt", tmp_path / "torch" / "model_optim_rng.pt")
    assert (tmp_path / "model_optim_rng.pt").read_bytes() == (tmp_path / "torch" / "model_optim_rng.pt").read_bytes()
    loaded = torch.load(tmp_path / "model_optim_rng.pt")
    assert loaded["iteration"] == 3 and set(loaded["model"]) == set(state) | {"rows"}
    for name, tensor in state.items():
        assert torch.equal(loaded["model"][name], tensor), name
    assert torch.equal(loaded["model"]["rows"], torch.cat([state["bf16"][:3], state["bf16"][5:9]]))


class Skeleton:
    """A file object that keeps the bytes written to it, except a large write (a record's data), of which it
    keeps the length: how torch's writer lays out records of 4 GiB without writing them."""

    def __init__(self):
        self.pieces = [b""]

    def write(self, data):
        size = len(memoryview(data))
        if size > 1 << 20:
            self.pieces += [size, b""]
        else:
            self.pieces[-1] += bytes(data)
        return size


def test_zip64_layout_is_torch_writers():
    """Records of 4 GiB and more, and records placed beyond 4 GiB, take miniz's zip64 fields; the same
    layout as torch's writer (data not written: untouched memory, only its length compared)."""
    huge = torch.empty((1 << 32) + 5, dtype=torch.uint8)
    leading = bytes(huge[:8].numpy())
    records = [("data/0", (1 << 32) + 5), ("data/1", 100), ("data/2", (1 << 32) - 1), ("data/3", 0),
               ("data/4", 7), ("data.pkl", 50)]
    sink = Skeleton()
    writer = torch._C.PyTorchFileWriter(sink, False, torch.serialization._get_storage_alignment())
    layout = torch_file.ZipLayout("archive")
    ours = [b""]
    for name, size in records:
        if size > 1 << 20:
            writer.write_record(name, huge.untyped_storage()[:size], size)
            _, header, trailer = layout.record(name, size, leading)
            ours[-1] += header
            ours += [size, trailer]
        else:
            writer.write_record(name, b"\x01" * size, size)
            ours[-1] += layout.small(name, b"\x01" * size)
    writer.write_end_of_file()
    ours[-1] += layout.closing()
    assert [len(p) if isinstance(p, bytes) else p for p in ours][1::2] == [(1 << 32) + 5, (1 << 32) - 1]
    assert ours == sink.pieces
