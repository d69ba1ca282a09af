"""Hugging Face model folders: lazy reading of safetensors or pytorch_model*.bin weights, and
safetensors writing planned up front so every tensor is written straight to its place on arrival."""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from converter_core.errors import ConversionError, require
from converter_core.formats import torch_file

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


def read_json(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None


class HFWeights:
    """Tensors of an HF folder by name, read one at a time; nothing is loaded until asked for."""

    def __init__(self, folder):
        self.folder = Path(folder)
        require(self.folder.is_dir(), f"{self.folder}: no such model folder")
        self._open = {}
        present = [name for name in WEIGHT_FILES if (self.folder / name).is_file()]
        require(present, f"{self.folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
        first = present[0]
        if first.endswith(".index.json"):
            index = read_json(self.folder / first)
            require(isinstance(index.get("weight_map"), dict), f"{self.folder / first}: no weight_map")
            self.file_of = {name: self.folder / file for name, file in index["weight_map"].items()}
            for path in set(self.file_of.values()):
                require(path.is_file(), f"{path}: missing, though {first} lists it")
        else:
            path = self.folder / first
            self.file_of = {name: path for name in self._handle(path).keys()}

    def _handle(self, path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                try:
                    self._open[path] = safe_open(str(path), framework="pt")
                except Exception as error:
                    raise ConversionError(f"{path}: unreadable safetensors file ({error})") from None
            else:
                self._open[path] = _BinFile(path)
        return self._open[path]

    def __contains__(self, name):
        return name in self.file_of

    def names(self):
        return list(self.file_of)

    def dtype(self, name):
        """The stored dtype of `name`, without reading its data."""
        require(name in self.file_of, f"{self.folder}: tensor {name} is missing from the weights")
        handle = self._handle(self.file_of[name])
        if isinstance(handle, _BinFile):
            return handle.get_tensor(name).dtype
        stored = handle.get_slice(name).get_dtype()
        require(stored in _DTYPES_BY_NAME, f"{self.file_of[name]}: {name} has dtype {stored}, which is not supported")
        return _DTYPES_BY_NAME[stored]

    def get(self, name):
        require(name in self.file_of, f"{self.folder}: tensor {name} is missing from the weights")
        path = self.file_of[name]
        try:
            return self._handle(path).get_tensor(name)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(f"{path}: cannot read {name} ({error})") from None


class _BinFile:
    """A pytorch_model*.bin read through the safe loader, memory-mapped."""

    def __init__(self, path):
        self.state = torch_file.load(path)
        require(isinstance(self.state, dict), f"{path}: expected a state dict")

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name):
        return self.state[name]


_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL"}


_DTYPES_BY_NAME = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


class PlannedSafetensors:
    """Writes a known list of tensors into safetensors shards (and an index when more than one).

    The plan (name, dtype, shape) fixes every header before any data arrives, so each tensor is
    written once at its final offset and never held. finish() fails unless every tensor was written.
    """

    def __init__(self, folder, plan, max_shard_bytes, prefix="model"):
        self.folder = Path(folder)
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
        self.where = {}       # name -> (fd, absolute offset, dtype, shape)
        self.pending = set()
        self.weight_map = {}
        self._fds = []
        self._total = 0
        for file, entries in zip(self.files, shards):
            self._open_shard(file, entries)

    def _open_shard(self, file, entries):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, dtype, shape, nbytes in entries:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        fd = os.open(self.folder / file, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        self._fds.append(fd)
        os.pwrite(fd, len(encoded).to_bytes(8, "little") + encoded, 0)
        start = 8 + len(encoded)
        os.ftruncate(fd, start + offset)
        for name, dtype, shape, nbytes in entries:
            self.where[name] = (fd, start + header[name]["data_offsets"][0], dtype, tuple(shape))
            self.pending.add(name)
            self.weight_map[name] = file
        self._total += offset

    def write(self, name, tensor):
        require(name in self.where, f"{self.folder}: tensor {name} is not part of the planned output")
        require(name in self.pending, f"{self.folder}: tensor {name} arrived twice")
        fd, offset, dtype, shape = self.where[name]
        require(tensor.dtype == dtype and tuple(tensor.shape) == shape,
                f"{name}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        written = 0
        while written < data.nbytes:
            written += os.pwrite(fd, data[written:], offset + written)
        self.pending.discard(name)

    def finish(self):
        require(not self.pending, f"{self.folder}: output incomplete, never received {sorted(self.pending)[:3]}")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self._total}, "weight_map": self.weight_map}
            with open(self.folder / "model.safetensors.index.json", "w") as handle:
                json.dump(index, handle, indent=2, sort_keys=True)
                handle.write("\n")


def _nbytes(dtype, shape):
    count = 1
    for size in shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()
