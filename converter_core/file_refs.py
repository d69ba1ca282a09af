"""Tensors that are untouched views of a memory-mapped source file cross the queue as a reference to
the file's bytes instead of a copy.

torch's queue pickling copies every tensor into a fresh shared-memory segment and the saver reads that
copy: two passes over each byte, both into newly mapped memory, before it is written. A tensor that only
views a source file (safetensors' and torch.load(mmap=True)'s mappings) is sent instead as (file, offset,
layout), and the saver maps the same page-cache pages, so its bytes are copied once, into the output, as
`cp` does. Applies only on our orchestrator's queue (our loader process installs it) and only to files a
loader registered as sources: our loaders never write into those tensors, and a page written in place in
a private mapping would no longer be the file's. Anything else travels the way torch sends it.

Nobody writes into a received one either, so our writers copy its bytes from the file itself, inside the
kernel (`file_range`, copy_file_range), as `cp` does, rather than from the mapping.
"""

import os
import sys

import torch
from torch.multiprocessing import reductions
from torch.multiprocessing.reductions import StorageWeakRef

from converter_core.errors import ConversionError

_sources = set()  # real paths of files this process reads weights from
_received = {}  # address of a storage received by reference -> (weak reference to it, fd, file offset, path)
_source_fds = {}  # (device, inode) -> the source file, open for reading


def register_source(path):
    """`path` is read-only input whose mapped tensors our loader passes on unmodified."""
    _sources.add(os.path.realpath(path))


def send_by_reference():
    """From now on this process's queues send tensors that view a registered source as references (Linux)."""
    if sys.platform.startswith("linux"):
        from multiprocessing.reduction import ForkingPickler
        ForkingPickler.register(torch.Tensor, _reduce_tensor)


def _reduce_tensor(tensor):
    reference = _file_reference(tensor) if _sources else None
    return reductions.reduce_tensor(tensor) if reference is None else (_rebuild, reference)


def _file_reference(tensor):
    """(path, device, inode, byte offset, nbytes, dtype, shape, stride, storage offset) when `tensor`'s whole
    storage lies inside a live mapping of a registered source file, else None."""
    if type(tensor) is not torch.Tensor or tensor.device.type != "cpu" or tensor.requires_grad:
        return None
    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    with open("/proc/self/maps") as maps:  # read now: the tensor keeps its mapping alive until it is sent
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 6:
                continue
            low, high = (int(end, 16) for end in fields[0].split("-"))
            if low <= start and start + size <= high:
                path = fields[5].rstrip("\n")
                if path not in _sources:
                    return None
                major, minor = (int(part, 16) for part in fields[3].split(":"))
                return (path, os.makedev(major, minor), int(fields[4]), int(fields[2], 16) + start - low, size,
                        tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())
    return None


def _rebuild(path, device, inode, offset, size, dtype, shape, stride, storage_offset):
    """The receiving side: the same bytes, mapped from the same file (copy-on-write, so never written back)."""
    status = os.stat(path)
    if (status.st_dev, status.st_ino) != (device, inode):
        raise ConversionError(f"{path}: the source file was replaced during the conversion")
    if (device, inode) not in _source_fds:
        _source_fds[device, inode] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    storage = torch.UntypedStorage.from_file(path, False, offset + size)[offset:offset + size]
    _received[storage.data_ptr()] = (StorageWeakRef(storage), _source_fds[device, inode], offset, path)
    return torch.empty(0, dtype=dtype).set_(storage, storage_offset, shape, stride)


def file_range(tensor):
    """(source fd, byte offset, path) of `tensor`'s bytes when it is a contiguous view of a tensor this process
    received by reference, else None. The weak reference tells a storage received here from a later one
    that happens to lie at the same address."""
    if not _received or not tensor.is_contiguous():
        return None
    storage = tensor.untyped_storage()
    entry = _received.get(storage.data_ptr())
    if entry is None or entry[0].cdata != storage._cdata:
        return None
    return entry[1], entry[2] + tensor.data_ptr() - storage.data_ptr(), entry[3]
