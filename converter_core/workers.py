"""Background writing for the savers (`--workers N`).

Writing is most of a conversion's time. A saver hands each write to a worker thread, so the bytes go
to disk while the next tensors are received and reshaped, and several files are written at once
(file writes and tensor copies release the GIL). Writes to one file keep their order on one thread,
so the output is byte-identical to writing inline, which is what one worker does.
"""

import contextlib
import math
import os
import queue
import threading

import torch

from converter_core import layout

# Jobs a worker may be behind before the saver waits: bounds the memory held by pending writes.
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
    parts = tuple(part.detach().cpu() for part in (parts if isinstance(parts, tuple) else (parts,)))
    if len(parts) == 1 and parts[0].is_contiguous():
        yield parts[0]
        return
    first, shape = parts[0], layout.rows_shape(parts)
    size = math.prod(shape) * first.element_size()
    if size > SCRATCH_LIMIT:
        with _large_gather:
            gathered = torch.cat(parts) if len(parts) > 1 else first.contiguous()
            yield gathered
            del gathered
        return
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _scratch.buffer = torch.empty(size, dtype=torch.uint8)
    out = buffer[:size].view(first.dtype).view(shape)
    yield torch.cat(parts, out=out) if len(parts) > 1 else out.copy_(first)


def default_count():
    """The CPUs this process may use, capped: beyond a few writers the disk is the limit."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


class Workers:
    """Runs jobs (callables) on `count` threads; jobs with the same key run in submission order on the
    same thread. With one worker every job runs inline, at submit. The first failure is re-raised in the
    saver's thread at the next submit or at finish(); later jobs are skipped."""

    def __init__(self, count):
        self.count = max(1, int(count or 1))
        self.error = None
        self.owner = {}
        self.queues = [queue.Queue(maxsize=BACKLOG) for _ in range(self.count if self.count > 1 else 0)]
        self.threads = [threading.Thread(target=self._run, args=(q,), daemon=True, name=f"converter-writer-{i}")
                        for i, q in enumerate(self.queues)]
        for thread in self.threads:
            thread.start()

    def submit(self, key, job):
        if not self.queues:
            job()
            return
        self._raise_failure()
        index = self.owner.setdefault(key, len(self.owner) % self.count)
        self.queues[index].put(job)

    def _run(self, jobs):
        while (job := jobs.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as error:  # re-raised in the saver's thread
                    self.error = error

    def _raise_failure(self):
        if self.error is not None:
            raise self.error

    def _stop(self):
        for jobs in self.queues:
            jobs.put(None)
        for thread in self.threads:
            thread.join()
        self.queues, self.threads = [], []

    def finish(self):
        """Wait until every job has run; re-raise the first failure."""
        self._stop()
        self._raise_failure()

    def abandon(self):
        """Skip what is still queued and wait for the running jobs (the output is being removed)."""
        if self.error is None:
            self.error = RuntimeError("abandoned")
        self._stop()
