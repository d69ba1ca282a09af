"""A torch_dist chunk is the exact bytes torch.save writes for the tensor into a file object (without the
CRC32s, which we do not compute), however its rows arrive: one tensor, row blocks written straight
from their own memory (SwiGLU's W and V), or blocks that are views and must be gathered first."""

import io

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
    archive = torch_file.ArchiveFile(tmp_path / "data")
    archive.write(b"header")  # chunks start wherever the previous one ended
    starts = []
    for parts, shape in cases:
        starts.append(archive.tell())
        torch_file.StreamingTorchFile(archive).save_tensor(parts, shape)
    end = archive.tell()
    archive.close()
    written = (tmp_path / "data").read_bytes()
    assert len(written) == end and written[:6] == b"header"
    for (parts, shape), start, stop in zip(cases, starts, starts[1:] + [end]):
        whole = torch.cat(parts) if isinstance(parts, tuple) else parts
        assert written[start:stop] == torch_save_bytes(whole.reshape(shape)), shape
        assert torch.equal(torch.load(io.BytesIO(written[start:stop])), whole.reshape(shape))
