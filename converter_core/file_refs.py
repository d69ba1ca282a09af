"""Tensors that are untouched views of a memory-mapped source file cross the queue as a reference to
the file's bytes instead of a copy.

torch's queue pickling copies every tensor into a fresh shared-memory segment and the saver reads that
copy: two passes over each byte, both into newly mapped memory, before it is written. A tensor that only
views a source file (safetensors' and torch.load(mmap=True)'s mappings) is sent instead as (file, offset,
layout), and the saver maps the same page-cache pages, so its bytes are copied once, into the output, as
`cp` does. Applies only on our orchestrator's queue (our loader process installs it) and only to files a
loader registered as sources: our loaders never write into those tensors, and a page written in place in
a private mapping would no longer be the file's. Anything else travels the way torch sends it.

The saver maps only the pages that hold the tensor (from the page its first byte is on), through the one
descriptor it keeps open per source file; the mapping lives as long as the tensor's storage. (Mapping from
the file's first byte, once per tensor, made the address space grow with the file: a 1.1 GB model needed
4.5 GiB of it, more than many clusters' `ulimit -v`.)

Nobody writes into a received one either, so our writers copy its bytes from the file itself, inside the
kernel (`file_range`, copy_file_range), as `cp` does, rather than from the mapping.

A source file cut short during the conversion (another tool rewriting it) must end the run with one line,
not a crash: reading a mapped page past a file's end raises SIGBUS, which kills a process. So sizes are
checked before a received tensor is mapped and before our writers read its pages (`check_intact`), and
as the last resort our loader on our queue and our savers (their writers) catch SIGBUS on source pages:
the handler puts zeros in place of the missing pages, so the read that faulted completes, and records the
file; our writers then refuse to write anything more (`check_sources`), and a loader's next tensor
arrives in the saver as that one-line error.
"""

import ctypes
import errno
import mmap
import os
import platform
import signal
import sys
import weakref

import torch
from torch.multiprocessing import reductions
from torch.multiprocessing.reductions import StorageWeakRef

from converter_core.errors import ConversionError, memory_hint

_sources = set()  # real paths of files this process reads weights from
_received = {}  # address of a storage received by reference -> (weak reference to it, fd, file offset, path)
_source_fds = {}  # (device, inode) -> the source file, open for reading
_mapped = set()  # real paths of the source files this process has mapped received tensors from
_cut = []  # source files a mapped page of which was read past the file's end (SIGBUS caught)
_zeroed = []  # (start, end) of the zeros mapped in place of such pages


def register_source(path):
    """`path` is read-only input whose mapped tensors our loader passes on unmodified."""
    _sources.add(os.path.realpath(path))


def send_by_reference():
    """From now on this process's queues send tensors that view a registered source as references (Linux)."""
    if sys.platform.startswith("linux"):
        from multiprocessing.reduction import ForkingPickler
        ForkingPickler.register(torch.Tensor, _reduce_tensor)
        catch_cut_sources()  # every tensor sent is checked (_reduce_tensor)


def _reduce_tensor(tensor):
    if _cut:  # computed from a page of a source cut short: it must not be written; the saver says why
        return _refuse, (_cut_message(),)
    reference = _file_reference(tensor) if _sources else None
    return reductions.reduce_tensor(tensor) if reference is None else (_rebuild, reference)


def _refuse(message):
    raise ConversionError(message)


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
    check_sources()
    status = os.stat(path)
    if (status.st_dev, status.st_ino) != (device, inode):
        raise ConversionError(f"{path}: the source file was replaced during the conversion")
    if (device, inode) not in _source_fds:
        _source_fds[device, inode] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        _mapped.add(path)
    fd = _source_fds[device, inode]
    storage = _map(fd, offset, size, path)
    _received[storage.data_ptr()] = (StorageWeakRef(storage), fd, offset, path)
    return torch.empty(0, dtype=dtype).set_(storage, storage_offset, shape, stride)


def _map(fd, offset, size, path):
    """An untyped storage of the `size` bytes at `offset` in the file open as `fd`, mapped copy-on-write
    from the page they start on; unmapped when the storage is freed."""
    if not size:
        return torch.UntypedStorage(0)
    _check_size(fd, offset, size, path)
    if _libc is None:
        return torch.UntypedStorage.from_file(path, False, offset + size)[offset:offset + size]
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    length = offset + size - start
    address = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, start)
    if address in (None, _MAP_FAILED):
        number = ctypes.get_errno()
        if number == errno.ENOMEM:
            raise ConversionError(f"{path}: cannot map {size} bytes at byte {offset}: out of memory"
                                  f"{memory_hint()}")
        raise ConversionError(f"{path}: cannot map {size} bytes at byte {offset} ({os.strerror(number)})")
    pages = (ctypes.c_ubyte * length).from_address(address)
    weakref.finalize(pages, _libc.munmap, address, length)  # torch.frombuffer's storage holds `pages`
    return torch.frombuffer(pages, dtype=torch.uint8, offset=offset - start, count=size).untyped_storage()


def _check_size(fd, offset, size, path):
    missing = offset + size - max(os.fstat(fd).st_size, offset)
    if missing > 0:
        raise ConversionError(f"{path}: the file ended {missing} bytes early; it changed during the conversion")


def file_range(tensor):
    """(source fd, byte offset, path) of `tensor`'s bytes when it is a contiguous view of a tensor this process
    received by reference, else None. The weak reference tells a storage received here from a later one
    that happens to lie at the same address."""
    if not _received or not tensor.is_contiguous():
        return None
    entry = _entry(tensor)
    if entry is None:
        return None
    return entry[1], entry[2] + tensor.data_ptr() - tensor.untyped_storage().data_ptr(), entry[3]


def _entry(tensor):
    storage = tensor.untyped_storage()
    entry = _received.get(storage.data_ptr())
    return None if entry is None or entry[0].cdata != storage._cdata else entry


def check_intact(*parts):
    """Before reading the pages of `parts` (tensors, tuples of them, Columns): raise ConversionError,
    naming the file, if one of them was received by reference and its source file no longer holds its
    bytes (a page past a file's end cannot be read), or if a mapped source page was already read past
    the file's end in this process."""
    check_sources()
    if not _received:
        return
    pending = list(parts)
    while pending:
        part = pending.pop()
        if isinstance(part, _PLAIN):  # e.g. the row views of a column slice, one per row: thousands
            continue
        if isinstance(part, (tuple, list)):
            pending.extend(part)
        elif not torch.is_tensor(part):
            pending.extend(getattr(part, "blocks", ()))  # layout.Columns
        elif part.device.type == "cpu":
            entry = _entry(part)
            if entry is not None and part.numel():  # the bytes from its first element to its last
                span = 1 + sum((size - 1) * stride for size, stride in zip(part.shape, part.stride()))
                _check_size(entry[1], entry[2] + part.storage_offset() * part.element_size(),
                            span * part.element_size(), entry[3])


_PLAIN = (memoryview, bytes, bytearray)


def check_sources():
    """Raise ConversionError naming the file if a mapped page of a source file was read past its end in
    this process (the bytes read were zeros in place of the missing pages)."""
    if _cut:
        raise ConversionError(_cut_message())


def _cut_message():
    return f"{_cut[0]}: the memory-mapped source file was cut short; it changed during the conversion"


# SIGBUS on a mapped source page past the file's end. Linux on x86_64 and aarch64 (struct layouts below).
class _SigAction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_SA_SIGINFO = 4
_SI_ADDR = 16  # offset of si_addr in siginfo_t (after si_signo, si_errno, si_code and padding)
_MAP_FAILED = ctypes.c_void_p(-1).value
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_handler = None
_previous = _SigAction()


def _load_libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # no C library to call (not a POSIX system): torch maps the tensors
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_SigAction), ctypes.POINTER(_SigAction)]
    return libc


_libc = _load_libc()


def catch_cut_sources():
    """Install the SIGBUS handler in this process, once (Linux x86_64 and aarch64; elsewhere a page past a
    cut file's end still kills the process). Only where what follows a read checks check_sources() before
    anything read can reach the output: our loader's queue (every tensor it sends) and our writers
    (workers.Workers); a saver of someone else's still dies there, never writing zeros."""
    global _handler
    if _handler is not None or _libc is None or not sys.platform.startswith("linux") or \
            platform.machine() not in ("x86_64", "aarch64"):
        return
    _handler = _HANDLER_TYPE(_on_sigbus)  # kept alive: the kernel calls it
    action = _SigAction(handler=ctypes.cast(_handler, ctypes.c_void_p).value, flags=_SA_SIGINFO)
    if _libc.sigaction(signal.SIGBUS, ctypes.byref(action), ctypes.byref(_previous)) != 0:
        _handler = None


def _on_sigbus(signum, info, context):
    """A read of a mapped page past its file's end. If the page is a source file's, map zeros in place of
    it and of the rest of that mapping, so the read completes; record the file, which fails the run at the
    next check. It runs in the faulting thread, synchronously (a copy out of the mapping, not code in the
    middle of changing Python's or the allocator's state); anything else gets the previous disposition
    back and faults again."""
    try:
        address = ctypes.c_void_p.from_address(info + _SI_ADDR).value or 0
        region = _region_of(address)
        if region is not None and not region[2] and any(low <= address < high for low, high in _zeroed):
            return  # another thread's fault on the same pages put the zeros there meanwhile
        if region is not None and (region[2] in _sources or region[2] in _mapped):
            page = address - address % mmap.PAGESIZE
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED
            if _libc.mmap(page, region[1] - page, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0) == page:
                _zeroed.append((page, region[1]))
                if region[2] not in _cut:
                    _cut.append(region[2])
                return
    except BaseException:
        pass
    _libc.sigaction(signal.SIGBUS, ctypes.byref(_previous), None)  # e.g. SIG_DFL, or faulthandler's


_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)


def _region_of(address):
    """(low, high, path) of the mapping of this process holding `address`, or None."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(end, 16) for end in fields[0].split("-"))
            if low <= address < high:
                return low, high, fields[5].rstrip("\n") if len(fields) == 6 else ""
    return None
