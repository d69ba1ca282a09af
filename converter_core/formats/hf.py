"""Hugging Face model folders: lazy reading of safetensors or pytorch_model*.bin weights, and
safetensors writing planned up front so every tensor is written straight to its place on arrival."""

import collections
import json
import os
import warnings
from pathlib import Path

import numpy
import torch
from safetensors import safe_open

from converter_core import dry_run, file_refs, layout, output, workers
from converter_core.errors import ConversionError, require, require_folder
from converter_core.formats import torch_file
from converter_core.formats.untrusted import check_weight_dtype, first_line, regular_file, safe_relative_path
from converter_core.formats.untrusted import read_json  # noqa: F401  (callers read HF JSON through this module)

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


class HFWeights:
    """Tensors of an HF folder by name, read one at a time; nothing is loaded until asked for."""

    def __init__(self, folder):
        self.folder = Path(folder)
        require_folder(self.folder)
        self._open, self._keys, self._mapped = {}, {}, {}
        present = [name for name in WEIGHT_FILES if os.path.lexists(self.folder / name)]
        require(present, f"{self.folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})", path=self.folder)
        first = self.folder / present[0]
        if first.name.endswith(".index.json"):
            index = read_json(first)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            require(isinstance(weight_map, dict), f"{first}: no weight_map")
            self.file_of = {name: safe_relative_path(self.folder, file, f"{first}: weight_map[{name!r}]")
                            for name, file in weight_map.items()}
            for path in set(self.file_of.values()):
                require(os.path.lexists(path), f"{path}: missing, though {first.name} lists it", path=path)
                regular_file(path)
        else:
            regular_file(first)
            self.file_of = {name: first for name in self._handle(first).keys()}

    def _handle(self, path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                try:
                    self._open[path] = safe_open(str(path), framework="pt")
                    self._keys[path] = set(self._open[path].keys())
                except Exception as error:
                    raise ConversionError(f"{path}: unreadable safetensors file ({first_line(error)})", path=path) from None
                file_refs.register_source(path)  # get_tensor returns views of safetensors' mapping
            else:
                self._open[path] = _BinFile(path)
                self._keys[path] = set(self._open[path].keys())
        return self._open[path]

    def _holding(self, name):
        """The open file that holds tensor `name`: the index may name a file that does not hold it."""
        require(name in self.file_of, f"{self.folder}: tensor {name} is missing from the weights")
        handle = self._handle(self.file_of[name])
        require(name in self._keys[self.file_of[name]],
                f"{self.file_of[name]}: holds no tensor {name}, though the index maps it to this file")
        return handle

    def __contains__(self, name):
        return name in self.file_of

    def _view(self, path, name):
        """Tensor `name` of safetensors file `path` as a view of one read-only mapping of the file, made
        without touching its pages: safetensors' get_tensor reads a tensor's first page, which the kernel's
        readahead turns into megabytes, so a rank of a job (converter_core.share) that never writes most
        tensors would read much of them anyway. The header was checked by safe_open."""
        if path not in self._mapped:
            with open(path, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(length))
            self._mapped[path] = (8 + length, header, numpy.memmap(path, dtype=numpy.uint8, mode="r"))
        start, header, mapped = self._mapped[path]
        entry = header[name]
        dtype, shape = _DTYPES_BY_NAME[entry["dtype"]], tuple(entry["shape"])
        begin, end = (start + offset for offset in entry["data_offsets"])
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # read-only memory: nothing writes through it
            return torch.frombuffer(mapped[begin:end], dtype=torch.uint8).view(dtype).view(shape)

    def names(self):
        return list(self.file_of)

    def stored_dtype(self, name):
        """The dtype `name` is stored in, whatever it is (float8 included), without reading its data."""
        handle = self._holding(name)
        if isinstance(handle, _BinFile):
            return handle.get_tensor(name).dtype
        stored = handle.get_slice(name).get_dtype()
        require(stored in _DTYPES_BY_NAME, f"{self.file_of[name]}: {name} has dtype {stored}, which is not supported")
        return _DTYPES_BY_NAME[stored]

    def dtype(self, name):
        """The stored dtype of `name`, without reading its data; refused unless a floating-point weight."""
        dtype = self.stored_dtype(name)
        check_weight_dtype(dtype, name, self.file_of[name])
        return dtype

    def shape(self, name):
        """The stored shape of `name`, without reading its data."""
        handle = self._holding(name)
        if isinstance(handle, _BinFile):
            return tuple(handle.get_tensor(name).shape)
        return tuple(handle.get_slice(name).get_shape())

    def get(self, name):
        """Tensor `name`, a floating-point weight (a view of the mapped file for safetensors)."""
        self.dtype(name)
        return self.stored(name)

    def stored(self, name):
        """Tensor `name` as stored, whatever its dtype: for a format that decodes it (formats/fp8.py)."""
        if dry_run.active():  # headers only
            return dry_run.meta(self.shape(name), self.stored_dtype(name))
        handle = self._holding(name)
        try:
            if not isinstance(handle, _BinFile):
                return self._view(self.file_of[name], name) if handle.get_slice(name).get_dtype() in _DTYPES_BY_NAME \
                    else handle.get_tensor(name)
            return handle.get_tensor(name)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"{self.file_of[name]}: cannot read {name} ({first_line(error)})",
                                  path=self.file_of[name]) from None


class DecodedWeights:
    """HFWeights seen through a stored encoding (formats/fp8.py, formats/mxfp4.py): `decoded` ({name: file})
    are the tensors the encoding stands for, read through decode(); the stored parts in `hidden` are not
    among the names. A subclass says the decoded tensors' dtype and, where it differs, shape."""
    decoded_dtype = torch.float32

    def __init__(self, weights, decoded, hidden):
        self.weights, self.decoded = weights, decoded
        self.file_of = {name: file for name, file in weights.file_of.items() if name not in hidden}
        self.file_of.update(decoded)

    def __contains__(self, name):
        return name in self.file_of

    def names(self):
        return list(self.file_of)

    def shape(self, name):
        return self.decoded_shape(name) if name in self.decoded else self.weights.shape(name)

    def dtype(self, name):
        return self.decoded_dtype if name in self.decoded else self.weights.dtype(name)

    def get(self, name):
        if name in self.decoded and dry_run.active():  # nothing to decode without the data
            return dry_run.meta(self.shape(name), self.dtype(name))
        return self.decode(name) if name in self.decoded else self.weights.get(name)

    def decoded_shape(self, name):
        return self.weights.shape(name)

    def decode(self, name):
        raise NotImplementedError


class _BinFile:
    """A pytorch_model*.bin read through the safe loader, memory-mapped."""

    def __init__(self, path):
        self.state = torch_file.load(path)
        require(isinstance(self.state, dict), f"{path}: expected a state dict")
        for name, value in self.state.items():
            require(isinstance(name, str) and torch.is_tensor(value), f"{path}: {name!r} is not a named tensor")

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name):
        return self.state[name]


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class PlannedSafetensors:
    """Writes a known list of tensors into safetensors shards (and an index when more than one).

    The plan (name, dtype, shape) fixes every header before any data arrives, so each tensor is
    written once at its final offset and never held. finish() fails unless every tensor was written.
    At most OPEN_FILES shards are open at a time (tensors arrive in plan order, so each is reopened
    rarely); a failed write is one line naming the file.
    """

    OPEN_FILES = 8

    def __init__(self, folder, plan, max_shard_bytes, prefix="model", share=None):
        """`share` (a converter_core.share.Share): write only the shards it gives this rank, and leave the
        index to whoever finishes the job (write_index with every rank's pieces)."""
        self.folder, self.share = Path(folder), share
        shards, current, size = [], [], 0
        for name, dtype, shape in plan:
            nbytes = _nbytes(dtype, shape)
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = [], 0
            current.append((name, dtype, shape, nbytes))
            size += nbytes
        if current or not shards:
            shards.append(current)
        count = len(shards)
        self.files = [f"{prefix}.safetensors" if count == 1 else f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors"
                      for i in range(count)]
        units = [(file, sum(entry[3] for entry in entries)) for file, entries in zip(self.files, shards)]
        mine = set(self.files if share is None else share.mine(units))
        self.where = {}       # name -> (file, absolute offset, dtype, shape), for the shards written here
        self.elsewhere = set()  # names in other ranks' shards
        self.pending = set()
        self.weight_map = {}
        self._fds = collections.OrderedDict()  # file -> fd, least recently used first
        self._total = 0
        for file, entries in zip(self.files, shards):
            self._create_shard(file, entries, file in mine)
        self.own_files = [file for file in self.files if file in mine]

    def _create_shard(self, file, entries, mine=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self._total += offset
        for name, *_ in entries:
            self.weight_map[name] = file
            if mine:
                self.pending.add(name)
        if not mine:
            self.elsewhere.update(name for name, *_ in entries)
            return
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        start = 8 + len(encoded)
        with output.writing(self.folder / file):
            fd = self._fd(file, create=True)
            workers.write_all(fd, [len(encoded).to_bytes(8, "little") + encoded], 0)
            os.ftruncate(fd, start + offset)
        for name, dtype, shape, nbytes in entries:
            self.where[name] = (file, start + header[name]["data_offsets"][0], dtype, tuple(shape))

    def owns(self, name):
        """Whether tensor `name` goes into a shard this writer writes (always, without a share)."""
        return name not in self.elsewhere

    def _fd(self, file, create=False):
        """An open descriptor of `file`, reusing or evicting from the small LRU of open shards."""
        if file in self._fds:
            self._fds.move_to_end(file)
            return self._fds[file]
        while len(self._fds) >= self.OPEN_FILES:
            os.close(self._fds.popitem(last=False)[1])
        flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if create else 0)  # new in a fresh folder
        self._fds[file] = os.open(self.folder / file, flags, 0o644)
        return self._fds[file]

    def write(self, name, tensor, run=None):  # `tensor`: a tensor, or a tuple of row blocks to concatenate
        """Write tensor `name`; with `run`, the writing is a job handed to run(name, job): each tensor has
        its planned place (pwrite), so the tensors of one shard may be written by several threads."""
        require(name in self.weight_map, f"{self.folder}: tensor {name} is not part of the planned output")
        if name in self.elsewhere:
            return  # in another rank's shard: that rank checks it arrives once
        require(name in self.pending, f"{self.folder}: tensor {name} arrived twice")
        file, offset, dtype, shape = self.where[name]
        parts = tensor if isinstance(tensor, tuple) else (tensor,)
        got = (parts[0].dtype, layout.rows_shape(parts))
        require(got == (dtype, shape), f"{name}: expected {dtype} {list(shape)}, got {got[0]} {list(got[1])}")
        self.pending.discard(name)
        job = lambda: self._write(file, offset, tensor)  # noqa: E731
        job() if run is None else run(name, job)

    def _write(self, file, offset, tensor):
        """Write one tensor at its planned offset, through its own descriptor (pwrite: any order, any thread)."""
        parts = tensor if isinstance(tensor, tuple) else (tensor,)
        with output.writing(self.folder / file):
            fd = os.open(self.folder / file, os.O_WRONLY)
            try:
                output.start_writeback(fd, offset, workers.write_rows(fd, offset, parts))
            finally:
                os.close(fd)

    def finish(self):
        """Check that every tensor arrived, put this writer's shards on disk and return its pieces (JSON):
        the shards it wrote and the index. Without a share, the index is written too (write_index)."""
        require(not self.pending, f"{self.folder}: output incomplete, never received {sorted(self.pending)[:3]}")
        self.close()
        for file in self.own_files:  # fsync syncs the file, whichever descriptor wrote it
            with output.writing(self.folder / file):
                fd = os.open(self.folder / file, os.O_WRONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        first = self.share is None or self.share.rank == 0  # the index is the same on every rank: rank 0's is used
        pieces = {"files": self.own_files, "all_files": self.files,
                  "index": {"metadata": {"total_size": self._total}, "weight_map": self.weight_map} if first else None}
        if self.share is None:
            write_index(self.folder, [pieces])
        return pieces

    def close(self):
        """Close the open shards (finish() does; a caller abandoning the output may too)."""
        while self._fds:
            os.close(self._fds.popitem()[1])


def write_index(folder, pieces):
    """Check that the shards of every rank's pieces are the planned ones, each written once and present,
    then write the index (when there is more than one shard)."""
    planned, written = pieces[0]["all_files"], sorted(file for piece in pieces for file in piece["files"])
    require(written == sorted(planned), f"{folder}: the ranks wrote shards {written[:4]}, not the planned {planned[:4]}")
    for file in planned:
        require((Path(folder) / file).is_file(), f"{Path(folder) / file}: missing (a rank wrote it elsewhere?)")
    if len(planned) > 1:
        with output.writing(Path(folder) / "model.safetensors.index.json"):
            with open(Path(folder) / "model.safetensors.index.json", "w") as handle:
                json.dump(pieces[0]["index"], handle, indent=2, sort_keys=True)
                handle.write("\n")


def _nbytes(dtype, shape):
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()
