"""torch.save's zip format, written incrementally and read safely.

`StreamingTorchFile` writes each tensor's bytes into the zip the moment it is added and keeps only a
small reference, so a rank file never has to exist in memory; the pickle that ties the references
together is written last. The result is an ordinary torch.save file (torch.load, mmap included).

`load` reads a checkpoint that is untrusted input: weights_only unpickling, with inert stand-ins for
Megatron's own classes (enums in the pickled args) and a one-line refusal for anything else.
"""

import argparse
import codecs
import collections
import enum
import io
import math
import os
import pickle
import signal
import struct
import sys
import zipfile

import torch

from converter_core import dry_run, file_refs, layout, output, workers
from converter_core.errors import ConversionError, require
from converter_core.formats.untrusted import first_line, regular_file

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
    """One torch.save archive built piece by piece: `tensor()` lays out a tensor's record and writes its
    bytes (now, or as a job for any thread: its place in the file is fixed), `close(obj)` writes the
    pickle and the end. The bytes are torch.save's, without CRC32s: torch.load never checks them, and
    computing them made writing four times slower."""

    def __init__(self, path, fd=None, start=0):
        """The archive that is file `path`, its records named after it as torch.save names them (a rank
        file's are model_optim_rng/...); or, given an open `fd`, the archive at byte `start` of that file,
        named as torch.save names one written into a file object (archive/...: a torch_dist chunk)."""
        self.path, self._own_fd, self._start = str(path), fd is None, start
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) if fd is None else fd
        self._zip = ZipLayout(os.path.splitext(os.path.basename(self.path))[0] if fd is None else "archive")
        self._count = 0

    def tensor(self, tensor, run=None, shape=None):
        """Write `tensor`'s bytes (a tensor, or a tuple of tensors whose rows are concatenated as written);
        return a stand-in to place in the object passed to close(), of `shape` if given (the same elements,
        e.g. with leading axes of size 1). With `run`, the writing is a job handed to run(key, job)."""
        parts = tensor if isinstance(tensor, tuple) else (tensor,)
        key, ref, offset, header, trailer = self._lay_out(parts, shape)
        job = lambda: self._write(offset, header, parts, trailer)  # noqa: E731
        job() if run is None else run(key, job)
        return ref

    def _lay_out(self, parts, shape):
        rows = layout.rows_shape(parts)
        shape = rows if shape is None else shape
        require(math.prod(shape) == math.prod(rows), f"{self.path}: {list(rows)} written as {list(shape)}")
        key = str(self._count)
        self._count += 1
        size = math.prod(rows) * parts[0].element_size()
        offset, header, trailer = self._zip.record(f"data/{key}", size, _leading_bytes(parts))
        return key, _TensorRef(_StorageRef(key, parts[0].dtype, math.prod(shape)), shape), offset, header, trailer

    def _write(self, offset, before, parts, after):
        at = self._start + offset
        output.start_writeback(self._fd, at, workers.write_rows(self._fd, at, parts, before, after))

    def save_tensor(self, parts, shape):
        """Lay out an archive holding one tensor (the rows of `parts`, as `shape`) byte for byte as torch.save
        lays it out: the pickle first, then the bytes, then the end. Returns (its length, the job that
        writes it all with one pwritev)."""
        parts = parts if isinstance(parts, tuple) else (parts,)
        ref = _TensorRef(_StorageRef(str(self._count), parts[0].dtype, math.prod(shape)), shape, plain_size=True)
        head = self._pickle_records(ref)
        _, _, _, header, trailer = self._lay_out(parts, shape)
        tail = self._zip.closing()
        return self._zip.end, lambda: self._write(0, head + header, parts, trailer + tail)

    def close(self, obj):
        """Write the pickle of `obj` (holding the stand-ins) and the end; every tensor job must have run."""
        at = self._zip.end
        self._write(at, self._pickle_records(obj) + self._zip.closing(), (), b"")
        self.abandon()

    def _pickle_records(self, obj):
        """data.pkl and the small records torch.save writes after it, laid out: their bytes."""
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(obj)
        records = (("data.pkl", buffer.getvalue()), (".format_version", b"1"),
                   (".storage_alignment", str(_ALIGNMENT).encode()), ("byteorder", sys.byteorder.encode()))
        return b"".join(self._zip.small(name, data) for name, data in records)

    def abandon(self):
        """Close the file if this archive opened it (close() does; a saver giving up may too)."""
        if self._own_fd and self._fd is not None:
            os.close(self._fd)
        self._fd = None


_ALIGNMENT = torch.serialization._get_storage_alignment()
_MAX32 = 0xFFFFFFFF
_LOCAL_SIGNATURE = b"PK\x03\x04"
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")


class ZipLayout:
    """The zip container torch.save writes (PyTorchStreamWriter over miniz: stored records, data aligned
    to 64 bytes by an "FB" extra field, sizes in a data descriptor, zip64 end records), laid out ahead of
    the bytes: each record's place is fixed when it is added, so its data may be written later, in any
    order, from any thread and from row blocks apart in memory. The bytes equal those of torch's own
    writer given the same records. The records torch adds when it ends a file (version, and a
    serialization id that hashes every record's name and, through a quirk, first bytes) are taken
    from a shadow torch writer that is given each record's name and first eight bytes."""

    def __init__(self, archive_name):
        self.prefix = archive_name + "/"
        self.end = 0  # the bytes laid out so far
        self._central, self._names = [], set()
        self._shadow = io.BytesIO()
        self._shadow_writer = torch._C.PyTorchFileWriter(self._shadow, False, _ALIGNMENT)

    def record(self, name, size, leading):
        """Lay out record `name` of `size` bytes, which begin with `leading` (its first eight bytes, or all
        if fewer), at the end: returns (offset, header, trailer), what goes before and after its data."""
        self._shadow_writer.write_record(name, leading, len(leading))
        return self._place(name, size)

    def small(self, name, data):
        """A record whose bytes are at hand, laid out at the end: header, data and trailer."""
        _, header, trailer = self.record(name, len(data), bytes(data[:8]))
        return header + data + trailer

    def _place(self, name, size):
        full, offset = (self.prefix + name).encode(), self.end
        large, far = size >= _MAX32, offset >= _MAX32  # where miniz switches a record to zip64 fields
        local64 = _zip64_extra(([size, 0] if large else []) + ([offset] if far else []))
        padding = -(offset + _LOCAL_HEADER.size + len(full) + len(local64) + 4) % _ALIGNMENT
        extra = local64 + b"FB" + struct.pack("<H", padding) + b"Z" * padding
        flags = 0x0808 if size else 0x0800  # UTF-8 names; a data descriptor follows non-empty data
        header = _LOCAL_HEADER.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(extra)) + full + extra
        trailer = b"" if not size else struct.pack("<IIQQ" if large or far else "<IIII", 0x08074B50, 0, size, size)
        central64 = _zip64_extra(([size, size] if large else []) + ([offset] if far else []))
        self._central.append(_CENTRAL_HEADER.pack(0x02014B50, 0, 0, flags, 0, 0, 0, 0, min(size, _MAX32),
                                                  min(size, _MAX32), len(full), len(central64), 0, 0, 0, 0,
                                                  min(offset, _MAX32)) + full + central64)
        self._names.add(name)
        self.end = offset + len(header) + size + len(trailer)
        return offset, header, trailer

    def closing(self):
        """Lay out what ends the archive: the records torch adds at the end of a file, the central
        directory and the end records; returns their bytes."""
        self._shadow_writer.write_end_of_file()
        shadow = torch._C.PyTorchFileReader(io.BytesIO(self._shadow.getvalue()))
        pieces = []
        for name in shadow.get_all_records():
            if name not in self._names:
                data = shadow.get_record(name)
                _, header, trailer = self._place(name, len(data))
                pieces += [header, data, trailer]
        directory, at, count = b"".join(self._central), self.end, len(self._central)
        pieces += [directory,
                   struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, count, count, len(directory), at),
                   struct.pack("<IIQI", 0x07064B50, 0, at + len(directory), 1),
                   struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
                               min(len(directory), _MAX32), min(at, _MAX32), 0)]
        self.end = at + sum(len(piece) for piece in pieces[-4:])
        return b"".join(pieces)


def _zip64_extra(values):
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


def _leading_bytes(parts, count=8):
    """The first `count` bytes of the rows of `parts`, read without copying a whole part (but a strided
    one whose rows are shorter than `count` bytes)."""
    if dry_run.active():  # no data: the serialization_id differs, the layout does not
        return bytes(count)
    file_refs.check_intact(parts)
    out = bytearray()
    for part in parts:
        if len(out) >= count:
            break
        if isinstance(part, layout.Columns):  # its first `count` rows hold the bytes wanted
            part = torch.cat([block[:count] for block in part.blocks], dim=1)
        if not part.numel():
            continue
        if part.is_contiguous() or part.shape[-1] * part.element_size() < count:
            flat = part.reshape(-1)
        else:  # a strided part's first row holds the bytes wanted
            flat = part[(0,) * (part.dim() - 1)]
        need = -(-(count - len(out)) // part.element_size())
        out += flat[:need].contiguous().view(torch.uint8).numpy().tobytes()
    return bytes(out[:count])


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


def _torch_globals():
    """What torch.save writes for tensors, their dtypes and sizes, bytes, sets and ordered dicts: plain
    rebuilds that run no code of the file's choosing. Storage classes stand for their dtypes (what
    persistent_load needs); the sparse, quantized and subclass rebuilds are left out, and so is
    bytearray, whose call with a number would allocate that many bytes."""
    allowed = {"torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
               "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
               "collections.OrderedDict": collections.OrderedDict, "torch.Size": torch.Size,
               "torch.device": torch.device, "_codecs.encode": codecs.encode, "builtins.set": set,
               "builtins.frozenset": frozenset, "torch.UntypedStorage": torch.uint8}
    allowed.update({str(value): value for value in vars(torch).values() if isinstance(value, torch.dtype)})
    allowed.update({f"torch.{name}": dtype for dtype, name in _STORAGE_TYPE_NAMES.items()})
    return allowed


class _RankFileUnpickler(pickle.Unpickler):
    """The C unpickler with our own allow list as its only source of globals. torch.load(weights_only=True)
    consults torch's process-wide list too, which torch.serialization.add_safe_globals widens (importing
    megatron.core adds pathlib.PosixPath, numpy's _reconstruct, ...); what a checkpoint may construct must
    not depend on who else is loaded. Storages are read from the archive's records (mapped when `mapped`)."""

    _ALLOWED = {**_torch_globals(), **SAFE_CLASSES}

    def __init__(self, data, path, reader, mapped):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.path, self.reader, self.mapped, self.storages = path, reader, mapped, {}
        self.fd = None

    def find_class(self, module, name):
        qualified_name = f"{module}.{name}"
        if qualified_name in self._ALLOWED:
            return self._ALLOWED[qualified_name]
        if qualified_name.startswith(STAND_IN_MODULES):
            return _stand_in(qualified_name)
        raise ConversionError(f"{self.path}: refusing to unpickle {qualified_name}: it could run code", path=self.path)

    def persistent_load(self, saved_id):
        """A storage record, as torch.save names it: ("storage", storage class, key, location, numel)."""
        ok = isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"
        dtype, key, numel = (saved_id[1], saved_id[2], saved_id[4]) if ok else (None, None, None)
        require(isinstance(dtype, torch.dtype) and isinstance(key, str) and type(numel) is int and numel >= 0,
                f"{self.path}: a storage reference {saved_id!r:.80} is not torch.save's")
        if key not in self.storages:
            name, nbytes = f"data/{key}", numel * dtype.itemsize
            require(self.reader.has_record(name) and self.reader.get_record_size(name) == nbytes,
                    f"{self.path}: storage {key} of {numel} {dtype} elements has no record of {nbytes} bytes")
            if dry_run.active():  # a dry run reads no tensor data
                storage = dry_run.meta((nbytes,), torch.uint8).untyped_storage()
            elif self.mapped is not None:  # torch's reader checks a record's header only when it copies it
                header = os.pread(self.fd, 4, self.reader.get_record_header_offset(name))
                require(header == _LOCAL_SIGNATURE, f"{self.path}: the zip header of record {name} is damaged")
                start = self.reader.get_record_offset(name)
                storage = self.mapped[start:start + nbytes]
            else:
                storage = torch.frombuffer(bytearray(self.reader.get_record(name)), dtype=torch.uint8).untyped_storage()
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)
        require(self.storages[key].dtype == dtype, f"{self.path}: storage {key} is referenced as two dtypes")
        return self.storages[key]


def load(path, mmap=True):
    """Read an untrusted torch.save file: tensors, containers, argparse.Namespace, torch dtypes, and inert
    stand-ins for Megatron classes; anything else that could run code is refused. Our own reader of torch's
    zip format (torch's C++ record reader, our unpickler), so only our allow list counts."""
    path = str(path)
    size = regular_file(path)
    try:
        with open(path, "rb") as handle:  # torch.load tells its zip format by these bytes too
            require(handle.read(4) == _LOCAL_SIGNATURE, f"{path}: not a torch.save zip archive")
            with zipfile.ZipFile(handle) as archive:
                for record in archive.infolist():
                    check_stored(record, path)
        reader = torch._C.PyTorchFileReader(path)
        for name in reader.get_all_records():  # checks every record's name, as torch.load does
            if name in (".format_version", ".storage_alignment"):
                reader.get_record(name)  # and reads these small ones, as it does
        reader.serialization_id()  # torch.load reads it too, and refuses a damaged one
        data = reader.get_record("data.pkl")
        order = reader.get_record("byteorder").decode(errors="replace") if reader.has_record("byteorder") else "little"
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"{path}: not a readable torch checkpoint ({first_line(error)})", path=path) from None
    require(order == sys.byteorder, f"{path}: stored {order[:20]}-endian, this machine is {sys.byteorder}-endian")
    if mmap:
        file_refs.register_source(path)
    unpickler = None
    try:
        mapped = torch.UntypedStorage.from_file(path, False, size) if mmap else None
        unpickler = _RankFileUnpickler(data, path, reader, mapped)
        unpickler.fd = os.open(path, os.O_RDONLY)
        state = unpickler.load()
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"{path}: cannot load ({first_line(error)})", path=path) from None
    finally:
        if unpickler is not None and unpickler.fd is not None:
            os.close(unpickler.fd)
    _check_megatron_entries(state, path)
    return state


def check_stored(record, where):
    """A zip record as torch.save writes it: stored, not encrypted, not a folder. torch's reader gives
    a record marked as a folder as that many bytes of uninitialized memory, without an error."""
    require(record.compress_type == zipfile.ZIP_STORED and not record.flag_bits & 1 and not record.is_dir()
            and not record.external_attr & 0x10, f"{where}: zip record {record.filename} is not a stored file "
                                                 f"(method {record.compress_type}, flags {record.flag_bits:#x}, "
                                                 f"attributes {record.external_attr:#x})")


def _check_megatron_entries(state, path):
    """A Megatron checkpoint's checkpoint_version, which its readers compare with numbers to choose a layout."""
    version = state.get("checkpoint_version", 0) if isinstance(state, dict) else 0
    require(type(version) in (int, float) and math.isfinite(version) and version >= 0,
            f"{path}: checkpoint_version {version!r:.40} is not a non-negative number")


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
