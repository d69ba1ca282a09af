"""Background writing for the savers (`--workers N`).

Writing is most of a conversion's time. A saver hands each write to a worker thread, so the bytes go
to disk while the next tensors are received and reshaped, and several files are written at once
(file writes and tensor copies release the GIL). Each write has its planned place in its file, so any
thread may run it and the output is byte-identical to writing inline, which is what one worker does.
"""

import collections
import contextlib
import errno
import math
import os
import queue
import threading
import weakref

import torch

from converter_core import dry_run, file_refs, layout
from converter_core.errors import ConversionError

# Jobs per worker that may wait to run before the saver waits: bounds the memory held by pending writes.
BACKLOG = 2
MAX_DEFAULT_WORKERS = 8
# Gathers up to this size reuse their thread's buffer; larger ones (an 8B model's SwiGLU shard, a padded
# vocabulary slice) get memory of their own, freed after the write. Kept small because every writer
# thread keeps its buffer for the whole run: 8 workers hold at most 0.5 GiB.
SCRATCH_LIMIT = 1 << 26
_scratch = threading.local()


_large_gather = threading.Lock()


@contextlib.contextmanager
def contiguous(parts):
    """The rows of `parts` (a tensor, or a tuple of tensors) as one contiguous tensor, for the duration
    of the `with`. A tensor already contiguous is used as it is; anything else is copied into a buffer
    the thread reuses, because filling freshly mapped memory costs about four times the copy itself
    (page faults), for every SwiGLU pair and row slice. Larger gathers get their own memory, one at a
    time over all threads, so the writers never add more than one large shard to the peak."""
    parts = tuple(layout.tensor_of(part).detach().cpu() for part in (parts if isinstance(parts, tuple) else (parts,)))
    file_refs.check_intact(parts)  # a received tensor's source must still hold the pages gathered below
    first, shape = parts[0], layout.rows_shape(parts)
    if _consecutive(parts):  # one tensor, or row blocks that follow each other in one storage ([W; V])
        yield first if len(parts) == 1 else torch.empty(0, dtype=first.dtype).set_(
            first.untyped_storage(), first.storage_offset(), shape)
        return
    size = math.prod(shape) * first.element_size()
    if size > SCRATCH_LIMIT:
        with _large_gather:
            gathered = torch.cat(parts) if len(parts) > 1 else first.contiguous()
            file_refs.check_sources()
            yield gathered
            del gathered
        return
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _scratch.buffer = torch.empty(size, dtype=torch.uint8)
    out = buffer[:size].view(first.dtype).view(shape)
    out = torch.cat(parts, out=out) if len(parts) > 1 else out.copy_(first)
    file_refs.check_sources()
    yield out


def _consecutive(parts):
    """Whether `parts` are contiguous row blocks lying one after another in the same storage."""
    if not all(part.is_contiguous() for part in parts):
        return False
    storage = parts[0].untyped_storage().data_ptr()
    return all(part.untyped_storage().data_ptr() == storage and part.dtype == before.dtype
               and part.shape[1:] == before.shape[1:] and part.data_ptr() == before.data_ptr() + before.nbytes
               for before, part in zip(parts, parts[1:]))


def write_all(fd, buffers, offset):
    """Write `buffers` (bytes-like objects or contiguous tensors) one after another at `offset`; returns
    the bytes written. Row blocks of a tensor are written from where they lie (pwritev), so blocks that
    are apart in memory need no gathering copy first. A tensor received by reference to a source file
    is copied from that file inside the kernel (copy_file_range):
    from a mapping, each page costs a fault and a copy from user memory, and writing an 8B-shape model
    into one file took 1.3-1.7x as long.

    Writes into one file take turns. The kernel lets one write into a file proceed at a time anyway
    (ext4's inode lock), and a thread waiting for it there spins on its CPU; waiting here it sleeps,
    leaving the CPU to the loader and the saver: 0.1-0.3 s less CPU time in a 2 s conversion.

    A tensor received by reference whose source file no longer holds its bytes (cut short during the
    conversion) is refused in one line naming the file, before or while it is read (file_refs)."""
    if dry_run.active():  # tensors take their room, unread and unwritten
        with _file_lock(fd):
            return dry_run.lay_out(fd, buffers, offset)
    with _reading(buffers), _file_lock(fd):
        return _write_all(fd, buffers, offset)


@contextlib.contextmanager
def _reading(parts):
    """Around a read of the pages of `parts` (buffers, tensors, Columns): a tensor received by reference
    whose source file was cut short is refused first, naming the file (a mapped page past a file's end
    cannot be read); if it is cut meanwhile, the kernel's read of the vanished page fails (EFAULT), and
    that is said the same way; and so is a page read past the file's end elsewhere in this process."""
    file_refs.check_intact(parts)
    try:
        yield
    except OSError as error:
        if error.errno == errno.EFAULT:
            file_refs.check_intact(parts)
        raise
    file_refs.check_sources()


_file_locks, _file_locks_guard = weakref.WeakValueDictionary(), threading.Lock()


def _file_lock(fd):
    """The lock of the file open as `fd` (any descriptor of it); it lives while a write holds it."""
    status = os.fstat(fd)
    with _file_locks_guard:
        return _file_locks.setdefault((status.st_dev, status.st_ino), threading.Lock())


def _write_all(fd, buffers, offset):
    if not hasattr(os, "copy_file_range"):
        return _write_buffers(fd, buffers, offset)
    start, pending = offset, []
    for buffer in buffers:
        source = file_refs.file_range(buffer) if torch.is_tensor(buffer) and buffer.nbytes else None
        if source is None:
            pending.append(buffer)
            continue
        offset += _write_buffers(fd, pending, offset)
        pending = []
        offset += _copy_from_file(*source, fd, offset, buffer)
    return offset + _write_buffers(fd, pending, offset) - start


# copy_file_range refused for these files (another filesystem, a kernel or sandbox without it): write from memory
_NO_FILE_COPY = {errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM}


def _copy_from_file(source, at, path, fd, offset, tensor):
    """Copy `tensor`'s bytes, which lie at `at` in the file `source` (`path`), to `fd` at `offset`."""
    done, size = 0, tensor.nbytes
    while done < size:
        try:
            copied = os.copy_file_range(source, fd, size - done, at + done, offset + done)
        except OSError as error:
            if error.errno not in _NO_FILE_COPY:
                raise
            file_refs.check_intact(tensor)  # the mapping's pages are read now
            return done + _write_buffers(fd, [_bytes_of(tensor)[done:]], offset + done)
        if copied == 0:
            raise ConversionError(f"{path}: the file ended {size - done} bytes early; it changed during the conversion")
        done += copied
    return size


def _bytes_of(tensor):
    """The bytes of a contiguous tensor, where they lie."""
    return memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())


def _write_buffers(fd, buffers, offset):
    views = [_bytes_of(buffer) if torch.is_tensor(buffer) else memoryview(buffer).cast("B") for buffer in buffers]
    views, total = [view for view in views if len(view)], sum(len(view) for view in views)
    while views:
        batch = views[:_IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]
    return total


def write_rows(fd, offset, parts, before=b"", after=b""):
    """Write `before`, the rows of `parts` (a tensor, Columns, or a tuple of row blocks) and `after` at
    `offset`, with one pwritev: the bytes straight from where they lie (a column slice or Columns row by
    row), or, for any other layout, gathered first (contiguous()); returns the bytes written."""
    parts = parts if isinstance(parts, tuple) else (parts,)
    if dry_run.active():
        return write_all(fd, [before, *parts, after], offset)
    pieces = [_pieces(part) for part in parts]
    if all(piece is not None for piece in pieces):
        with _reading(parts):  # the row views below are plain buffers: say which file they came from
            return write_all(fd, [before, *(view for piece in pieces for view in piece), after], offset)
    with contiguous(parts) as whole:
        return write_all(fd, [before, whole, after], offset)


def _pieces(part):
    """The bytes of `part` in row-major order, as buffers where they lie: a contiguous tensor as itself;
    a 2-D tensor whose rows are contiguous (a column slice), or Columns, one buffer per row and block.
    None for other layouts."""
    if isinstance(part, layout.Columns):
        rows = [_row_views(block) for block in part.blocks]
        return None if None in rows else [view for row in zip(*rows) for view in row]
    return [part] if part.is_contiguous() else _row_views(part)


def _row_views(tensor):
    if tensor.dim() != 2 or (tensor.shape[1] > 1 and tensor.stride(1) != 1):
        return None
    size = tensor.element_size()
    storage = memoryview(torch.empty(0, dtype=torch.uint8).set_(tensor.untyped_storage()).numpy())
    start, step, length = tensor.storage_offset() * size, tensor.stride(0) * size, tensor.shape[1] * size
    return [storage[start + row * step:start + row * step + length] for row in range(tensor.shape[0])]


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 16


def default_count():
    """The CPUs this process may use, capped: beyond a few writers the disk is the limit."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


class Workers:
    """Runs jobs (callables) on `count` threads; jobs with the same key run in submission order, one at a
    time, and jobs with different keys on whichever thread is free (a thread that finishes a job runs the
    next one of its key, so one large tensor never holds up the others). With one worker every job runs
    inline, at submit. The first failure is re-raised in the saver's thread at the next submit or at
    finish(); later jobs are skipped."""

    def __init__(self, count):
        file_refs.catch_cut_sources()  # pages of a source cut short are refused before they are written
        self.count = max(1, int(count or 1))
        self.error = None
        self.ready = queue.Queue()  # (key, job): the first job of a key that has nothing running
        self.behind = {}  # key -> the jobs submitted while one of that key was queued or running
        self.lock = threading.Lock()
        self.room = threading.Semaphore((BACKLOG + 1) * self.count)  # jobs not yet run: bounds their memory
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"converter-writer-{i}")
                        for i in range(self.count if self.count > 1 else 0)]
        for thread in self.threads:
            thread.start()

    def submit(self, key, job):
        if not self.threads:
            job()
            return
        self._raise_failure()
        self.room.acquire()
        with self.lock:
            if key in self.behind:
                self.behind[key].append(job)
                return
            self.behind[key] = collections.deque()
        self.ready.put((key, job))

    def _run(self):
        while (item := self.ready.get()) is not None:
            key, job = item
            while job is not None:
                if self.error is None:
                    try:
                        job()
                    except BaseException as error:  # re-raised in the saver's thread
                        self.error = error
                self.room.release()
                with self.lock:
                    job = self.behind[key].popleft() if self.behind[key] else None
                    if job is None:
                        del self.behind[key]

    def _raise_failure(self):
        if self.error is not None:
            raise self.error

    def _stop(self):
        for _ in self.threads:  # after every job: each key's queued jobs are run by the thread holding its first
            self.ready.put(None)
        for thread in self.threads:
            thread.join()
        self.threads = []

    def finish(self):
        """Wait until every job has run; re-raise the first failure; refuse the output if a source page
        was read past its file's end in this process meanwhile (file_refs)."""
        self._stop()
        self._raise_failure()
        file_refs.check_sources()

    def abandon(self):
        """Skip what is still queued and wait for the running jobs (the output is being removed)."""
        if self.error is None:
            self.error = RuntimeError("abandoned")
        self._stop()
