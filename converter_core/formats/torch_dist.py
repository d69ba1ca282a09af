"""Megatron-Core's torch_dist format (PyTorch DCP files plus common.pt and metadata.json), read and
written in one process with no process group and without Megatron.

Reading parses DCP's own layout: `.metadata` (a pickle, unpickled here with an allow list) maps every
chunk of every tensor to a byte range of a `.distcp` file holding a torch.save zip; the tensor bytes
inside are memory-mapped, so reading one layer of a stacked [L, ...] tensor touches only that layer.
Writing appends each chunk as it arrives and writes `.metadata` last.
"""

import copyreg
import io
import json
import math
import os
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import numpy
import torch

from converter_core import dry_run, file_refs, layout, workers
from converter_core.errors import ConversionError, require
from converter_core.formats import torch_file
from converter_core.formats.untrusted import check_weight_dtype, first_line, regular_file, safe_relative_path

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
DCP_METADATA = ".metadata"
COMMON = "common.pt"


class _DcpObject:
    """Stands for an object of one of DCP's metadata dataclasses when .metadata is written: _MetadataPickler
    writes its class under DCP's name and its fields in the real object's order, so the file holds the
    pickle opcodes that pickling DCP's own objects writes (tests/test_torch_dist.py checks), without
    importing torch.distributed.checkpoint (0.5-0.9 s of every torch_dist conversion)."""

    def __init__(self, **fields):  # in the order DCP's __init__ sets them
        self.__dict__.update(fields)

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (type(self),), self._state()

    def _state(self):
        return dict(self.__dict__) or None


def _dcp_class(name, module="metadata", **methods):
    return type(name, (_DcpObject,), {"dcp_name": f"torch.distributed.checkpoint.{module}.{name}", **methods})


_TensorStorageMetadata = _dcp_class("TensorStorageMetadata")
_ChunkStorageMetadata = _dcp_class("ChunkStorageMetadata")
_BytesStorageMetadata = _dcp_class("BytesStorageMetadata")
_StorageMeta = _dcp_class("StorageMeta")
_Metadata = _dcp_class("Metadata")
_StorageInfo = _dcp_class("_StorageInfo", module="filesystem")
_MetadataIndex = _dcp_class("MetadataIndex", __eq__=lambda self, other: self.__dict__ == other.__dict__,
                            __hash__=lambda self: hash((self.fqn, self.__dict__.get("offset"), self.index)))
_MemoryFormat = _dcp_class("_MEM_FORMAT_ENCODING", __reduce_ex__=lambda self, protocol: (type(self), (0,)))
_CONTIGUOUS_FORMAT = _MemoryFormat()  # an enum member: one object, pickled once and then referenced
# DCP pickles TensorProperties as a tuple: (dtype, layout, requires_grad, memory format, pin_memory).
_TensorProperties = _dcp_class("TensorProperties", _state=lambda self: (
    self.dtype, torch.strided, False, _CONTIGUOUS_FORMAT, False))


class _MetadataPickler(pickle._Pickler):
    """The pure-Python pickler, so that a stand-in's class can be written under DCP's name (the C pickler
    insists that the name resolves to the object, i.e. an import of DCP). Its opcodes are the C pickler's;
    in a file over 64 KiB its frames (an encoding detail unpicklers do not depend on) may end a few
    opcodes apart from the C pickler's."""

    def save_global(self, obj, name=None):
        qualified_name = getattr(obj, "dcp_name", None)
        if qualified_name is None or not isinstance(obj, type):
            return super().save_global(obj, name)
        module, _, name = qualified_name.rpartition(".")
        self.save(sys.intern(module))  # one object, as a module's __name__ is: pickled once, then referenced
        self.save(name)
        self.write(pickle.STACK_GLOBAL)
        self.memoize(obj)


def is_dist_checkpoint(folder):
    folder = Path(folder)
    return (folder / "metadata.json").exists() or (folder / DCP_METADATA).exists()


_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # Megatron keeps its save plans in the metadata (Metadata.all_local_plans).
    ("torch.distributed.checkpoint.planner", "SavePlan"), ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"), ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _Record:
    """What the reader keeps of an object of one of DCP's classes: its pickled fields, as attributes.
    Reading a checkpoint then needs no import of torch.distributed.checkpoint (0.6-1 s of every run);
    writing one needs none either (_DcpObject)."""

    def __init__(self, *args):  # DCP's enums are pickled as a call with their value
        self.args = args

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif type(self).__name__ == "TensorProperties":  # pickled as (dtype, layout, requires_grad, ...)
            self.dtype = state[0]
        else:
            self.state = state


_RECORDS = {name: type(name, (_Record,), {}) for module, name in _METADATA_CLASSES
            if module.startswith("torch.distributed.checkpoint.")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata holds dataclasses of torch.distributed.checkpoint (read as _Records), torch sizes
    and dtypes; nothing else may be constructed from an untrusted file."""

    def find_class(self, module, name):
        if "." not in name and (module, name) in _METADATA_CLASSES:
            return _RECORDS[name] if name in _RECORDS else super().find_class(module, name)
        if module == "torch" and "." not in name and isinstance(getattr(torch, name, None),
                                                                (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: it could run code")


_STORAGE_DTYPES = {name: dtype for dtype, name in torch.storage._dtype_to_storage_type_map().items()}


class _ChunkSpec:
    """What the data.pkl of one chunk's torch.save describes: its storage record, dtype and view."""

    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype


class _ChunkUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return dict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch", "Size"):
            return torch.Size
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a tensor chunk")

    def persistent_load(self, saved_id):
        ok = isinstance(saved_id, tuple) and len(saved_id) == 5 and saved_id[0] == "storage"
        if not (ok and isinstance(saved_id[1], torch.dtype) and isinstance(saved_id[2], str)):
            raise pickle.UnpicklingError(f"a storage reference {saved_id!r:.80} is not torch.save's")
        return _ChunkSpec(saved_id[2], saved_id[1])


class _Slice(io.RawIOBase):
    """A read-only window [start, start + length) of a file, for zipfile."""

    def __init__(self, handle, start, length):
        self.handle, self.start, self.length, self.position = handle, start, length, 0

    def seekable(self):
        return True

    def readable(self):
        return True

    def seek(self, offset, whence=0):
        base = {0: 0, 1: self.position, 2: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self):
        return self.position

    def readinto(self, buffer):
        size = max(0, min(len(buffer), self.length - self.position))
        self.handle.seek(self.start + self.position)
        data = self.handle.read(size)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


class DistReader:
    """Tensors of a torch_dist iteration folder by key, whole or one index of the leading axis.

    `.metadata` is untrusted: every storage entry must name a file inside the folder and a byte range
    within it, and a tensor's chunks must lie in its bounds and cover it exactly once (checked when the
    tensor is first used, so optimizer states we never read cannot stop a conversion)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        path = self.where = self.folder / DCP_METADATA
        require(os.path.lexists(path), f"{path}: missing (a torch_dist checkpoint needs its DCP metadata)")
        regular_file(path)
        try:
            with open(path, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
        except Exception as error:  # whatever a damaged pickle raises
            raise ConversionError(f"{path}: unreadable DCP metadata ({type(error).__name__}: {first_line(error)})") from None
        require(isinstance(metadata, _RECORDS["Metadata"])
                and isinstance(getattr(metadata, "state_dict_metadata", None), dict)
                and isinstance(getattr(metadata, "storage_data", None), dict), f"{path}: not DCP metadata")
        self.tensors = {k: v for k, v in metadata.state_dict_metadata.items()
                        if isinstance(v, _RECORDS["TensorStorageMetadata"])}
        self.storage = {}
        for index, info in metadata.storage_data.items():
            require(isinstance(index, _RECORDS["MetadataIndex"]) and isinstance(info, _RECORDS["_StorageInfo"]),
                    f"{path}: a storage entry is not DCP's MetadataIndex -> _StorageInfo")
            fqn, offsets = getattr(index, "fqn", None), getattr(index, "offset", None)
            where = f"{path}: storage entry of {fqn!r:.60}"
            require(_ints(offsets or ()) is not None, f"{where}: offsets {offsets!r:.40} are not non-negative integers")
            safe_relative_path(self.folder, getattr(info, "relative_path", None), where)
            byte_range = (getattr(info, "offset", None), getattr(info, "length", None))
            require(_ints(byte_range) is not None, f"{where}: byte range {byte_range!r:.40} is not two non-negative integers")
            self.storage[fqn, _ints(offsets or ())] = info
        self._checked, self._file_sizes = set(), {}

    def __contains__(self, key):
        return key in self.tensors

    def shape(self, key):
        return tuple(self._meta(key).size)

    def _meta(self, key):
        """The metadata of tensor `key`, checked on first use (the loader asks for every weight's shape
        before it streams anything): a floating-point weight whose chunks cover it exactly once, each
        stored within a regular file of the folder."""
        require(key in self.tensors, f"{self.where}: no tensor {key}")
        meta = self.tensors[key]
        if key not in self._checked:
            _check_chunks(meta, f"{self.where}: {key}")
            check_weight_dtype(meta.properties.dtype, key, self.where)
            for chunk in meta.chunks:
                info = self.storage.get((key, tuple(chunk.offsets)))
                require(info is not None, f"{self.where}: no storage entry for {key} at {list(chunk.offsets)}")
                path = self.folder / info.relative_path
                if path not in self._file_sizes:
                    require(os.path.lexists(path), f"{path}: missing")
                    self._file_sizes[path] = regular_file(path)
                require(self._file_sizes[path] >= info.offset + info.length,
                        f"{path}: truncated (needs {info.offset + info.length} bytes for {key})")
            self._checked.add(key)
        return meta

    def read(self, key, index=None):
        """The global tensor `key`, or its slice [index] along the first axis; assembled from chunks."""
        meta = self._meta(key)
        dtype = meta.properties.dtype
        require(index is None or meta.size and 0 <= index < meta.size[0], f"{self.where}: {key} has no index {index}")
        shape = tuple(meta.size) if index is None else tuple(meta.size)[1:]
        chunks = [(tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks
                  if index is None or c.offsets[0] <= index < c.offsets[0] + c.sizes[0]]
        if len(chunks) == 1 and chunks[0][1] == ((1,) if index is not None else ()) + shape:
            view = self._chunk(key, *chunks[0], dtype)  # the chunk is exactly the tensor: send its mapping
            return view if index is None else view[0]  # (a file reference on our queue, no copy)
        result = layout.empty_shared(shape, dtype)  # sent on the loader's queue without a copy
        for offsets, sizes in chunks:  # checked: in bounds, and together covering `result` exactly once
            view = self._chunk(key, offsets, sizes, dtype)
            if index is not None:
                view, offsets, sizes = view[index - offsets[0]], offsets[1:], sizes[1:]
            result[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = view
        return result

    def _chunk(self, key, offsets, sizes, dtype):
        info = self.storage[key, offsets]
        require(not getattr(info, "transform_descriptors", None), f"{self.folder}: {key} is stored transformed (unsupported)")
        path = self.folder / info.relative_path
        if dry_run.active():  # a dry run reads no tensor data
            return dry_run.meta(sizes, dtype)
        try:
            return _mapped_tensor(path, info.offset, info.length, sizes, dtype)
        except ConversionError:
            raise
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError, zipfile.BadZipFile,
                pickle.UnpicklingError, struct.error, KeyError, EOFError) as error:
            raise ConversionError(f"{path}: cannot read {key} ({first_line(error)}); the file may be truncated") from None


def _ints(values):
    """`values` as a tuple of non-negative ints, or None if it is anything else."""
    try:
        values = tuple(values)
    except TypeError:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return values
    return None


def _check_chunks(meta, where):
    """A tensor's size is non-negative integers, its dtype a torch dtype, and its chunks lie inside it
    and cover it exactly once: in bounds, volumes adding up to its size, no two overlapping."""
    size = _ints(getattr(meta, "size", None))
    require(size is not None, f"{where}: size {getattr(meta, 'size', None)!r:.60} is not a list of non-negative integers")
    require(isinstance(getattr(getattr(meta, "properties", None), "dtype", None), torch.dtype), f"{where}: no torch dtype")
    require(isinstance(getattr(meta, "chunks", None), list), f"{where}: chunks are not a list")
    boxes = []
    for chunk in meta.chunks:
        offsets, sizes = _ints(getattr(chunk, "offsets", None)), _ints(getattr(chunk, "sizes", None))
        require(offsets is not None and sizes is not None and len(offsets) == len(sizes) == len(size)
                and all(o + s <= n for o, s, n in zip(offsets, sizes, size)),
                f"{where}: chunk at {getattr(chunk, 'offsets', None)!r:.60} of size {getattr(chunk, 'sizes', None)!r:.60} "
                f"is not inside the tensor's {list(size)}")
        boxes.append((offsets, sizes))
    volume = sum(math.prod(sizes) for _, sizes in boxes)
    require(volume == math.prod(size), f"{where}: the chunks hold {volume} elements, the tensor {math.prod(size)}")
    # Sweep along the first axis: only chunks whose first-axis ranges meet can overlap.
    boxes.sort()
    active = []
    for offsets, sizes in boxes:
        start = offsets[0] if offsets else 0
        active = [(o, s) for o, s in active if (o[0] + s[0] if o else 1) > start]
        for other_offsets, other_sizes in active:
            require(not all(max(a, b) < min(a + m, b + n)
                            for a, m, b, n in zip(offsets, sizes, other_offsets, other_sizes)),
                    f"{where}: chunks at {list(offsets)} and {list(other_offsets)} overlap")
        active.append((offsets, sizes))


def _mapped_tensor(path, start, length, sizes, dtype):
    """Memory-map the tensor that a torch.save zip at [start, start + length) of `path` holds (a range
    DistReader checked to lie within the file)."""
    with open(path, "rb") as handle:
        # exactly one archive, from its first record to its end record: zipfile alone would also accept a
        # range that starts early or ends late, which torch's reader (and so DCP's) refuses
        handle.seek(start)
        first = handle.read(4)
        handle.seek(start + length - 22)
        require(first == b"PK\x03\x04" and handle.read(4) == b"PK\x05\x06",
                f"{path}: the item at byte {start} of {length} bytes is not a torch.save archive")
        archive = zipfile.ZipFile(_Slice(handle, start, length))
        pickle_names = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        require(len(pickle_names) == 1, f"{path}: the item at byte {start} is not a torch.save archive")
        pickle_info = archive.getinfo(pickle_names[0])
        handle.seek(_data_offset(handle, start, length, pickle_info))
        storage, offset, size, stride = _ChunkUnpickler(io.BytesIO(handle.read(pickle_info.file_size))).load()
        record = archive.getinfo(pickle_names[0][:-len("data.pkl")] + f"data/{storage.key}")
        data_start = _data_offset(handle, start, length, record)
        order = [info for info in archive.infolist() if info.filename == pickle_names[0][:-len("data.pkl")] + "byteorder"]
        if order:  # torch.load (and so DCP) refuses a chunk whose byte order it does not know
            handle.seek(_data_offset(handle, start, length, order[0]))
            stored = handle.read(order[0].file_size).decode(errors="replace")
            require(stored == sys.byteorder, f"{path}: the item at byte {start} is stored {stored[:20]}-endian, "
                                             f"this machine is {sys.byteorder}-endian")
    require(storage.dtype == dtype and size == tuple(sizes), f"{path}: chunk is {storage.dtype} {list(size)}, "
            f"the metadata says {dtype} {list(sizes)}")
    nbytes = record.file_size
    file_refs.register_source(path)  # mapped read-only: nothing can write into its tensors
    mapped = numpy.memmap(path, dtype=numpy.uint8, mode="r", offset=data_start, shape=(nbytes,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory: we never write through it
        flat = torch.frombuffer(mapped, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
    return flat.as_strided(size, stride, offset)  # a RuntimeError if the view runs past the bytes


def _data_offset(handle, start, length, record):
    """Where a stored (uncompressed) zip record's bytes begin, checked to end inside the item
    [start, start + length). Read directly, not through zipfile, so archives written without CRC32
    (as we write them) read as well as torch's own."""
    torch_file.check_stored(record, handle.name)
    handle.seek(start + record.header_offset)
    header = handle.read(30)
    require(len(header) == 30 and header[:4] == b"PK\x03\x04",
            f"{handle.name}: the zip header of record {record.filename} at byte {start} is damaged")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    begin = record.header_offset + 30 + name_length + extra_length
    require(begin + record.file_size <= length,
            f"{handle.name}: record {record.filename} runs past its item's {length} bytes at byte {start}")
    return start + begin


def read_common(folder):
    path = Path(folder) / COMMON
    require(path.is_file(), f"{path}: missing (a torch_dist checkpoint keeps its args there)")
    common = torch_file.load(path, mmap=False)
    require(isinstance(common, dict) and "args" in common, f"{path}: no 'args' in the common state")
    return common


class DistWriter:
    """A torch_dist iteration folder written chunk by chunk into this writer's data file `__<rank>_0.distcp`
    (DCP's name for rank `rank`'s). Every writer of a job sees every chunk in the same order, declares every
    tensor and object, and writes only the chunks the caller says are its own (`mine`); pieces() is what it
    wrote, and write_metadata turns every writer's pieces into `.metadata`, which is what makes the folder a
    checkpoint. One writer alone: finish() does all of it."""

    def __init__(self, folder, rank=0):
        self.folder, self.rank = Path(folder), rank
        self.name = f"__{rank}_0.distcp"
        self.path = self.folder / self.name
        self.fd = None  # opened on the first chunk of its own: a writer given none leaves no file
        self.end = 0  # the data file's bytes laid out so far
        self.state = []  # [key, dtype, shape] of each tensor, [key] of each object, in the order declared
        self.dtypes = {}
        self.written = []  # [sequence, key, offsets, sizes, offset, length] (offsets, sizes None: an object)
        self.sequence = 0  # chunks and objects seen, own or not: their order in .metadata

    def declare(self, key, dtype, shape):
        self.state.append([key, str(dtype).removeprefix("torch."), list(shape)])
        self.dtypes[key] = dtype

    def _data_fd(self):
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        return self.fd

    def _lay_out(self, key, offsets, sizes, length):
        """Record a chunk or object of our own of `length` bytes, placed at the data file's end."""
        self.written.append([self.sequence, key, offsets, sizes, self.end, length])
        self.end += length

    def write_chunk(self, key, parts, offsets, mine=True):
        """Lay out the chunk of `key` at `offsets`: the rows of `parts` (a tensor, or a tuple whose rows are
        concatenated as written, e.g. SwiGLU's W and V), with leading axes of size 1 for the offsets
        beyond its own dimensions. Returns the job that writes it, the bytes torch.save would write, from
        the views; its place is fixed, so jobs may run on any thread, in any order. Not `mine`: another
        writer's chunk, only counted (returns None)."""
        self.sequence += 1
        if not mine:
            return None
        parts = parts if isinstance(parts, tuple) else (parts,)
        require(parts[0].dtype == self.dtypes[key], f"{key}: chunk dtype {parts[0].dtype} is not {self.dtypes[key]}")
        rows = layout.rows_shape(parts)
        shape = (1,) * (len(offsets) - len(rows)) + rows
        length, job = torch_file.StreamingTorchFile(self.path, self._data_fd(), self.end).save_tensor(parts, shape)
        self._lay_out(key, list(offsets), list(shape), length)
        return job

    def write_object(self, key, value, mine=True):
        """Lay out a Megatron ShardedObject: torch.save of its value (small), stored as bytes. Returns the
        job that writes it (None when not `mine`)."""
        self.state.append([key])
        self.sequence += 1
        if not mine:
            return None
        buffer = io.BytesIO()
        torch.save(value, buffer)
        data, start, fd = buffer.getvalue(), self.end, self._data_fd()
        self._lay_out(key, None, None, len(data))
        return lambda: workers.write_all(fd, [data], start)

    def pieces(self):
        """What write_metadata needs from this writer: its file and chunks, and (the same in every writer of a
        job) the declared tensors and objects."""
        return {"file": self.name if self.written else None, "bytes": self.end,
                "state": self.state if self.rank == 0 else None, "written": self.written}

    def close(self):
        """Put the data file on disk and close it; returns pieces()."""
        if self.fd is not None:
            os.fsync(self.fd)
        self.abandon()
        return self.pieces()

    def finish(self, common):
        """A writer alone: close, then write common.pt, metadata.json and .metadata."""
        pieces = self.close()
        write_common(self.folder, common)
        write_metadata(self.folder, [pieces])

    def abandon(self):
        """Close the data file (close() does; a saver giving up does too)."""
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None


def write_common(folder, common):
    torch_file.save(Path(folder) / COMMON, common)
    (Path(folder) / "metadata.json").write_text(json.dumps(METADATA_JSON))


def write_metadata(folder, pieces):
    """`.metadata` from every writer's pieces (the first's declarations; chunks and objects in the order the
    writers saw them, so any number of writers give the same entries), once every tensor is covered."""
    folder = Path(folder)
    state, tensors = {}, {}
    for row in pieces[0]["state"]:
        if len(row) == 1:
            state[row[0]] = _BytesStorageMetadata()
        else:
            meta = _TensorStorageMetadata(properties=_TensorProperties(dtype=getattr(torch, row[1])),
                                          size=torch.Size(row[2]), chunks=[])
            state[row[0]] = tensors[row[0]] = meta
    storage = {}
    for piece in pieces:
        if piece["file"] is not None:
            path = folder / piece["file"]
            require(path.is_file() and path.stat().st_size >= piece["bytes"], f"{path}: missing or cut short")
    entries = sorted((entry + [piece["file"]] for piece in pieces for entry in piece["written"]), key=lambda e: e[0])
    for _, key, offsets, sizes, start, length, file in entries:
        if sizes is None:
            index = _MetadataIndex(fqn=key, index=None)
        else:
            tensors[key].chunks.append(_ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
            index = _MetadataIndex(fqn=key, index=None, offset=torch.Size(offsets))
        require(index not in storage, f"{folder}: {key} at {offsets} was written twice")
        storage[index] = _StorageInfo(relative_path=file, offset=start, length=length)
    for key, meta in state.items():
        if key in tensors:
            covered = sum(int(torch.Size(c.sizes).numel()) for c in meta.chunks)
            require(covered == meta.size.numel(), f"{folder}: {key} was not written completely")
        else:
            require(_MetadataIndex(fqn=key, index=None) in storage, f"{folder}: {key} was not written")
    metadata = _Metadata(state_dict_metadata=state, planner_data=None, storage_data=storage,
                         storage_meta=_StorageMeta(checkpoint_id=None, save_id=None, load_id=None, modules=[]),
                         version="1.0.0")
    with open(folder / DCP_METADATA, "wb") as handle:
        _MetadataPickler(handle, protocol=pickle.DEFAULT_PROTOCOL).dump(metadata)
