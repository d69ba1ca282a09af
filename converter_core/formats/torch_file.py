"""torch.save's zip format, written incrementally and read safely.

`StreamingTorchFile` writes each tensor's bytes into the zip the moment it is added and keeps only a
small reference, so a rank file never has to exist in memory; the pickle that ties the references
together is written last. The result is an ordinary torch.save file (torch.load, mmap included).

`load` reads a checkpoint that is untrusted input: weights_only unpickling, with inert stand-ins for
Megatron's own classes (enums in the pickled args) and a one-line refusal for anything else.
"""

import argparse
import collections
import io
import pickle
import sys

import torch

from converter_core.errors import ConversionError

_STORAGE_TYPE_NAMES = torch.storage._dtype_to_storage_type_map()


class _StorageRef:
    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as torch pickles a contiguous tensor whose storage was already written."""

    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride, running = [], 1
        for size in reversed(self.shape):
            stride.insert(0, running)
            running *= size
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), tuple(stride), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, _STORAGE_TYPE_NAMES[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None


class StreamingTorchFile:
    """One torch.save file built piece by piece: `tensor()` writes bytes now, `close(obj)` writes the pickle."""

    def __init__(self, path):
        self.path = str(path)
        # No CRC32: torch.load never checks it, and computing it made writing four times slower.
        self._writer = torch._C.PyTorchFileWriter(self.path, False, torch.serialization._get_storage_alignment())
        self._count = 0

    def tensor(self, tensor):
        """Write `tensor`'s bytes; return a stand-in to place in the object passed to close()."""
        tensor = tensor.detach().cpu().contiguous()
        key = str(self._count)
        self._count += 1
        storage = tensor.untyped_storage()
        if tensor.storage_offset() != 0 or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone()
            storage = tensor.untyped_storage()
        self._writer.write_record(f"data/{key}", storage, tensor.nbytes)
        return _TensorRef(_StorageRef(key, tensor.dtype, tensor.numel()), tensor.shape)

    def close(self, obj):
        buffer = io.BytesIO()
        _Pickler(buffer, protocol=2).dump(obj)
        data = buffer.getvalue()
        self._writer.write_record("data.pkl", data, len(data))
        self._writer.write_record(".format_version", "1", 1)
        alignment = str(torch.serialization._get_storage_alignment())
        self._writer.write_record(".storage_alignment", alignment, len(alignment))
        self._writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self._writer.write_end_of_file()
        self._writer = None


def _stand_in(qualified_name):
    """An inert class named like a Megatron class; it only records how it was built."""
    module, _, name = qualified_name.rpartition(".")

    def init(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def setstate(self, state):
        self.state = state

    def reduce(self):
        # Never write our stand-in into an output: it degrades to its plain value.
        raise TypeError(f"{qualified_name} stand-in must be converted with plain_value() before saving")

    return type(name, (), {"__module__": module, "__init__": init, "__setstate__": setstate,
                           "__reduce__": reduce, "stand_in_for": qualified_name})


def plain_value(value):
    """A stand-in (e.g. a Megatron enum) as a builtin: the enum's value, else its class name."""
    if hasattr(type(value), "stand_in_for"):
        return value.args[0] if len(getattr(value, "args", ())) == 1 else type(value).stand_in_for
    return value


STAND_IN_MODULES = ("megatron.", "transformer_engine.", "modelopt.")
# Plain classes whose construction runs no code: Megatron's args, old TE's BytesIO extra state.
SAFE_CLASSES = {"argparse.Namespace": argparse.Namespace, "_io.BytesIO": io.BytesIO}


def load(path, mmap=True):
    """torch.load an untrusted checkpoint file: tensors, containers, argparse.Namespace, torch dtypes,
    and inert stand-ins for Megatron classes; anything else that could run code is refused."""
    path = str(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as error:
        raise ConversionError(f"{path}: not a readable torch checkpoint ({_first_line(error)})") from None
    refused = [g for g in unsafe if not g.startswith(STAND_IN_MODULES) and g not in SAFE_CLASSES]
    if refused:
        raise ConversionError(f"{path}: refusing to unpickle {', '.join(refused)}: it could run code")
    allowed = list(SAFE_CLASSES.values()) + [(_stand_in(g), g) for g in unsafe if g.startswith(STAND_IN_MODULES)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:
        raise ConversionError(f"{path}: cannot load ({_first_line(error)})") from None


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def sanitize_namespace(args):
    """Replace stand-ins inside a loaded args Namespace by plain values, so it can be saved anywhere."""
    for name, value in vars(args).items():
        setattr(args, name, plain_value(value))
    return args
