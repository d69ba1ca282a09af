"""torch.save's zip format, written incrementally and read safely.

`StreamingTorchFile` writes each tensor's bytes into the zip the moment it is added and keeps only a
small reference, so a rank file never has to exist in memory; the pickle that ties the references
together is written last. The result is an ordinary torch.save file (torch.load, mmap included).

`load` reads a checkpoint that is untrusted input: weights_only unpickling, with inert stand-ins for
Megatron's own classes (enums in the pickled args) and a one-line refusal for anything else.
"""

import argparse
import collections
import contextlib
import enum
import io
import math
import os
import pickle
import signal
import sys

import numpy
import torch

from converter_core import file_refs, layout, output, workers
from converter_core.errors import ConversionError, require
from converter_core.formats.untrusted import regular_file

_STORAGE_TYPE_NAMES = torch.storage._dtype_to_storage_type_map()


class _StorageRef:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as torch pickles a contiguous tensor whose storage was already written."""

    def __init__(self, storage, shape, plain_size=False):
        self.storage, self.shape, self.plain_size = storage, tuple(shape), plain_size

    def __reduce_ex__(self, protocol):
        stride, running = [], 1
        for size in reversed(self.shape):
            stride.insert(0, running)
            running *= size
        size = self.shape if self.plain_size else torch.Size(self.shape)  # torch.save's is a plain tuple
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, size, tuple(stride), False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):
    """torch.save's pickle of the object tree. The pure-Python pickler, because a stand-in must be
    written under the name of the class it stands for (the C pickler insists the name resolves here);
    data.pkl is small, so its speed does not matter."""

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, _STORAGE_TYPE_NAMES[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj):
        if hasattr(type(obj), "stand_in_for"):
            return (type(obj), obj.args) if obj.state is None else (type(obj), obj.args, obj.state)
        return NotImplemented

    def save_global(self, obj, name=None):
        qualified_name = getattr(obj, "stand_in_for", None)
        if qualified_name is None or not isinstance(obj, type):
            return super().save_global(obj, name)
        module, _, name = qualified_name.rpartition(".")
        self.write(pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n")
        self.memoize(obj)


class StreamingTorchFile:
    """One torch.save file built piece by piece: `tensor()` writes bytes now, `close(obj)` writes the pickle."""

    def __init__(self, path):
        """`path`: a file name, or an ArchiveFile (the archive goes at its position). The records of a named
        file are named after it, as torch.save names them (a rank file's are model_optim_rng/...); an
        ArchiveFile's are archive/..., as torch.save names them in a file object (a torch_dist chunk)."""
        self._file = path if isinstance(path, ArchiveFile) else None
        self.path = str(path) if self._file is None else path.name
        # No CRC32: torch.load never checks it, and computing it made writing four times slower.
        self._writer = torch._C.PyTorchFileWriter(self.path if self._file is None else self._file, False,
                                                  torch.serialization._get_storage_alignment())
        self._fd = os.open(self.path, os.O_RDONLY) if self._file is None else self._file.fileno()  # for writeback
        self._written = os.fstat(self._fd).st_size  # where the disk's writeback has been started up to
        self._count = 0

    def tensor(self, tensor, run=None, shape=None):
        """Write `tensor`'s bytes (a tensor, or a tuple of tensors whose rows are concatenated as written);
        return a stand-in to place in the object passed to close(), of `shape` if given (the same elements,
        e.g. with leading axes of size 1). With `run`, the writing is a job handed to it (records are
        numbered now, so jobs must run in order)."""
        parts = tensor if isinstance(tensor, tuple) else (tensor,)
        rows = layout.rows_shape(parts)
        shape = rows if shape is None else shape
        require(math.prod(shape) == math.prod(rows), f"{self.path}: {list(rows)} written as {list(shape)}")
        key = str(self._count)
        self._count += 1
        job = lambda: self._write(key, parts)  # noqa: E731
        job() if run is None else run(job)
        return _TensorRef(_StorageRef(key, parts[0].dtype, math.prod(shape)), shape)

    def _write(self, key, parts):
        if self._file is not None and len(parts) > 1 and all(part.is_contiguous() for part in parts):
            size = sum(part.nbytes for part in parts)
            with self._file.parts_for_placeholder(parts, size) as placeholder:
                self._writer.write_record(f"data/{key}", placeholder, size)
        else:
            with workers.contiguous(parts) as tensor:
                tensor = tensor.detach()
                start, size = tensor.storage_offset() * tensor.element_size(), tensor.nbytes
                storage = tensor.untyped_storage()
                if start or storage.nbytes() != size:  # a view (a TP shard's rows): its bytes, without a copy
                    storage = storage[start:start + size]
                self._writer.write_record(f"data/{key}", storage, size)
        self._start_writeback()

    def _start_writeback(self):
        end = os.fstat(self._fd).st_size
        output.start_writeback(self._fd, self._written, end - self._written)
        self._written = end

    def save_tensor(self, parts, shape):
        """The archive holds one tensor (the rows of `parts`, as `shape`), laid out byte for byte as
        torch.save lays it out: the pickle first, then the bytes; then it is closed."""
        dtype = (parts[0] if isinstance(parts, tuple) else parts).dtype
        self._write_pickle(_TensorRef(_StorageRef(str(self._count), dtype, math.prod(shape)), shape, plain_size=True))
        self.tensor(parts, shape=shape)
        self._end()

    def close(self, obj):
        self._write_pickle(obj)
        self._end()

    def _write_pickle(self, obj):
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(obj)
        data = buffer.getvalue()
        self._writer.write_record("data.pkl", data, len(data))
        self._writer.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        self._writer.write_record(".storage_alignment", alignment, len(alignment))
        self._writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def _end(self):
        self._writer.write_end_of_file()
        self._writer = None
        self._start_writeback()
        if self._file is None:
            os.close(self._fd)


class ArchiveFile(io.RawIOBase):
    """The file PyTorchFileWriter writes an archive into: unbuffered, keeping its own position (where
    each torch_dist chunk starts). A record can be written from several tensors: the writer is given a
    placeholder of the record's size, never read, and its one write of the placeholder's bytes becomes
    writes of the parts, so rows that arrive apart (SwiGLU's W and V) need no gathering copy."""

    def __init__(self, path):
        self.name = str(path)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._position = 0
        self._placeholder = None  # (address, size, parts) while a record is written from parts

    def writable(self):
        return True

    def fileno(self):
        return self._fd

    def tell(self):
        return self._position

    def write(self, data):
        view = memoryview(data).cast("B")
        placeholder = self._placeholder
        if placeholder is not None and len(view) == placeholder[1] and _address(view) == placeholder[0]:
            workers.write_all(self._fd, placeholder[2])
        else:
            workers.write_all(self._fd, [view])
        self._position += len(view)
        return len(view)

    @contextlib.contextmanager
    def parts_for_placeholder(self, parts, size):
        """A storage of `size` bytes (untouched memory) whose write is replaced by the bytes of `parts`."""
        placeholder = torch.empty(size, dtype=torch.uint8)
        self._placeholder = (placeholder.data_ptr(), size, parts)
        try:
            yield placeholder.untyped_storage()
        finally:
            self._placeholder = None

    def close(self):
        if not self.closed:
            os.close(self._fd)
        super().close()


def _address(view):
    return numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data if len(view) else 0


_STAND_IN_CLASSES = {}


def _stand_in(qualified_name):
    """An inert class named like a Megatron class (mostly enums in the pickled args): building one only
    records its arguments. Our files write it back under its original name; between processes it
    travels through restore_stand_in."""
    if qualified_name in _STAND_IN_CLASSES:
        return _STAND_IN_CLASSES[qualified_name]
    module, _, name = qualified_name.rpartition(".")

    def init(self, *args):
        self.args, self.state = args, None

    def setstate(self, state):
        self.state = state

    def reduce(self):
        return restore_stand_in, (qualified_name, self.args, self.state)

    def describe(self):
        return f"{qualified_name}{self.args!r}"

    def equal(self, other):
        return type(other) is type(self) and (other.args, other.state) == (self.args, self.state)

    def hashed(self):
        return hash((qualified_name, repr(self.args)))

    cls = type(name, (), {"__module__": module, "__init__": init, "__setstate__": setstate, "__reduce__": reduce,
                          "__repr__": describe, "__eq__": equal, "__hash__": hashed, "args": (), "state": None,
                          "stand_in_for": qualified_name})
    _STAND_IN_CLASSES[qualified_name] = cls
    return cls


def restore_stand_in(qualified_name, args, state):
    """Unpickles a stand-in sent to another process: the real enum when that process has already
    imported its module (Megatron's own saver under our CLI), else the stand-in again. Never imports."""
    module, _, name = qualified_name.rpartition(".")
    real = getattr(sys.modules.get(module), name, None)
    if isinstance(real, enum.EnumMeta) and state is None:
        return real(*args)
    value = _stand_in(qualified_name)(*args)
    if state is not None:
        value.__setstate__(state)
    return value


def is_stand_in(value):
    return hasattr(type(value), "stand_in_for")


STAND_IN_MODULES = ("megatron.", "transformer_engine.", "modelopt.")
# Plain classes whose construction runs no code: Megatron's args, old TE's BytesIO extra state, and
# the signal number Megatron-LM keeps in args.exit_signal.
SAFE_CLASSES = {"argparse.Namespace": argparse.Namespace, "_io.BytesIO": io.BytesIO, "signal.Signals": signal.Signals}


def load(path, mmap=True):
    """torch.load an untrusted checkpoint file: tensors, containers, argparse.Namespace, torch dtypes,
    and inert stand-ins for Megatron classes; anything else that could run code is refused."""
    path = str(path)
    regular_file(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:
        raise ConversionError(f"{path}: not a readable torch checkpoint ({_first_line(error)})") from None
    refused = [g for g in unsafe if not g.startswith(STAND_IN_MODULES) and g not in SAFE_CLASSES]
    if refused:
        raise ConversionError(f"{path}: refusing to unpickle {', '.join(refused)}: it could run code")
    allowed = list(SAFE_CLASSES.values()) + [(_stand_in(g), g) for g in unsafe if g.startswith(STAND_IN_MODULES)]
    if mmap:
        file_refs.register_source(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise ConversionError(f"{path}: cannot load ({_first_line(error)})") from None


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def storable(value):
    """`value` as something our safe loader reads back and Megatron-LM understands: builtins, torch
    dtypes, Namespaces, signal numbers and Megatron's enums (real or stand-in) stay; any other object
    in a foreign plugin's args becomes its enum value or its text."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype)) and not isinstance(value, enum.Enum):
        return value
    if is_stand_in(value) or isinstance(value, signal.Signals):
        return value
    if isinstance(value, enum.Enum):
        return value if type(value).__module__.startswith(STAND_IN_MODULES) else storable(value.value)
    if isinstance(value, (list, tuple)):
        items = [storable(item) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, argparse.Namespace):
        return storable_namespace(value)
    return str(value)


def storable_namespace(args):
    """A copy of an args Namespace holding only storable values."""
    return argparse.Namespace(**{name: storable(value) for name, value in vars(args).items()})


def save(path, obj):
    """torch.save of a tensor-free object (common.pt), through our pickler."""
    StreamingTorchFile(path).close(obj)
