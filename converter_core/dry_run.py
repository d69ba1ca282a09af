"""--dry-run / convert(dry_run=True): a conversion's plan without the conversion. The real loader and
saver run as usual, with every check they make, and two switches set (enter()):

- the source readers hand out meta tensors (a shape and a dtype, no data): no tensor byte is read, and
  what a loader builds from them (grouped QKV, merged TP shards) is built on the meta device too;
- the output is laid out in a scratch mirror of it (mirror()) in memory (/dev/shm where there is one):
  headers, pickles, config.json and the tracker are written there, tensors only take their room (the
  files are sparse, of their exact sizes). The parent lists the mirror as the plan and removes it.

The --save-dir itself is only looked at (the same checks as a real run), never written: no staged folder,
no lock file, no tracker. A plugin not built on converter_core (Megatron's own) cannot honour this and is
refused in one line."""

import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from converter_core.errors import ConversionError

# The scratch folder of this process's dry run (a loader or saver), or None (a real run); in the parent, the
# calling thread's only (_thread.scratch), so a real run started meanwhile from another thread is untouched.
_scratch = None
_thread = threading.local()
# A run writing less than this is mostly start-up: its rate says nothing about a large one.
MIN_RATE_BYTES = 100 * 2**20


def enter(scratch, thread_only=False):
    """Switch this process (or with `thread_only`, this thread) into (a folder) or out of (None) a dry run."""
    global _scratch
    if thread_only:
        _thread.scratch = None if scratch is None else str(scratch)
    else:
        _scratch = None if scratch is None else str(scratch)


def _current():
    return _scratch or getattr(_thread, "scratch", None)


def active():
    return _current() is not None


def mirror(path):
    """Where output `path` lies: itself, or in a dry run the same absolute path under the scratch folder."""
    scratch = _current()
    if scratch is None:
        return path
    return Path(scratch, *Path(os.path.abspath(path)).parts[1:])


def meta(shape, dtype):
    """A source tensor in a dry run: its shape and dtype, no data."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def equal(a, b):
    """torch.equal, but tensors of a dry run (meta) have no values to compare: they count as equal."""
    return a.is_meta or b.is_meta or torch.equal(a, b)


def lay_out(fd, buffers, offset):
    """A dry run's write of `buffers` at `offset` (workers.write_all): bytes (headers, a record's frame) are
    written, a tensor (or Columns) only takes its room; the file grows to the end, sparse. Returns the
    bytes laid out. The caller holds the file's lock, so the size only grows."""
    start = offset
    for buffer in buffers:
        if hasattr(buffer, "dtype"):
            offset += math.prod(buffer.shape) * buffer.dtype.itemsize
            continue
        view = memoryview(buffer).cast("B")
        while len(view):
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
    if os.fstat(fd).st_size < offset:
        os.ftruncate(fd, offset)
    return offset - start


@dataclasses.dataclass
class PlannedFile:
    path: Path   # relative to save_dir
    bytes: int   # its size: exactly what the real run writes


@dataclasses.dataclass
class Plan:
    """What a real run of the same options would write (Result.plan of a dry run)."""
    files: list                # PlannedFile: every file of the output, relative to save_dir, with its size
    bytes_read: int            # tensor bytes the loader reads and sends (as sent: after a --bf16 / dequantization)
    bytes_written: int         # the files' total size
    estimated_seconds: float   # bytes_written at the last measured rate; None: no rate measured yet
    rate: float                # that rate, bytes written per second, or None
    free_bytes: int            # free space on the --save-dir's filesystem

    def lines(self):
        """The plan as a person reads it."""
        out = [f"  {file.path}  {_size(file.bytes)}" for file in self.files]
        out.append(f"{len(self.files)} files: {_size(self.bytes_read)} to read, {_size(self.bytes_written)} to write "
                   f"({_size(self.free_bytes)} free there)")
        if self.rate is None:
            out.append("estimated time: no rate measured yet (a real run of at least "
                       f"{_size(MIN_RATE_BYTES)} records one)")
        else:
            out.append(f"estimated time: {self.estimated_seconds:.0f} s at {self.rate / 1e9:.2f} GB/s, "
                       "the last measured rate")
        return out


def _size(count):
    return f"{count / 1e9:.3f} GB" if count >= 1e7 else f"{count:,} bytes"


def check_plugins(loader, saver, names):
    """Only plugins built on converter_core (HF families, our Megatron formats) read meta tensors and lay
    their files out in the mirror; Megatron's own plugins would read and write for real."""
    for role, module, name in (("loader", loader, names[0]), ("saver", saver, names[1])):
        if not hasattr(module, "FAMILIES") and not hasattr(module, "MEGATRON_FORMATS"):
            raise ConversionError(f"--dry-run: the {name} {role} is not built on converter_core and cannot plan "
                                  "without reading and writing; run without --dry-run", role="arguments")


def run(args, loader, saver, on_event=None, **supervision):
    """Run the conversion `args` describes as a dry run (orchestrator.run's `supervision` keywords);
    returns its Plan. Raises ConversionError as a real run would, and when the output would not fit."""
    from converter_core import orchestrator  # which imports this module
    check_plugins(loader, saver, (args.loader, args.saver))
    memory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    scratch = tempfile.mkdtemp(prefix="converter_core-dry-run-", dir=memory)
    args.dry_run_scratch = scratch  # the children enter() it (under spawn too)
    sent = 0

    def count(event):
        nonlocal sent
        if event.get("event") == "sent":
            sent += event.get("bytes") or 0
        if on_event is not None:
            on_event(event)

    enter(scratch, thread_only=True)  # the parent's lock and its clean-up of dead staging go to the mirror too
    try:
        orchestrator.run(args, loader, saver, on_event=count, **supervision)
        folder = mirror(args.save_dir)
        files = [PlannedFile(path.relative_to(folder), path.stat().st_size)
                 for path in sorted(folder.rglob("*")) if path.is_file()]
    finally:
        enter(None, thread_only=True)
        shutil.rmtree(scratch, ignore_errors=True)
    written = sum(file.bytes for file in files)
    free = free_bytes(args.save_dir)
    if written > free:
        raise ConversionError(f"--save-dir {args.save_dir}: the output needs {_size(written)}, its filesystem has "
                              f"{_size(free)} free", role="arguments", path=args.save_dir)
    rate = measured_rate()
    return Plan(files, sent, written, None if rate is None else written / rate, rate, free)


def free_bytes(save_dir):
    """Free space (for this user) on the filesystem --save-dir is, or will be, on."""
    folder = Path(os.path.abspath(save_dir))
    while not folder.is_dir():
        folder = folder.parent
    disk = os.statvfs(folder)
    return disk.f_bavail * disk.f_frsize


def _rate_file():
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "converter_core", "rate.json")


def record_rate(written, seconds):
    """Remember a real run's rate (bytes written per second) for the next dry run's estimate; runs under
    MIN_RATE_BYTES are not measured. A cache that cannot be written is no failure."""
    if written < MIN_RATE_BYTES or seconds <= 0:
        return
    path = _rate_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".rate.")
        with os.fdopen(fd, "w") as handle:
            json.dump({"bytes_per_second": written / seconds, "bytes": written, "seconds": seconds,
                       "recorded": time.time()}, handle)
        os.replace(temporary, path)
    except OSError:
        pass


def measured_rate():
    """The last real run's bytes written per second, or None."""
    try:
        rate = json.loads(_rate_file().read_text())["bytes_per_second"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rate if isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0 else None
