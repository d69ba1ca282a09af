"""Reading a checkpoint as untrusted input: the one home of the checks every format reader shares.

Paths named inside a checkpoint stay inside its folder (checked as written, so links the user made
keep working); files are regular files, never a FIFO or a device that blocks or never ends; JSON is
size-capped; counts are positive integers; weights have a floating-point dtype.
"""

import json
import os
import stat
from pathlib import Path, PurePosixPath

import torch

from converter_core.errors import ConversionError, first_line, require

MAX_JSON_BYTES = 64 * 2**20
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def regular_file(path):
    """`path` (links followed) is an existing regular file; returns its size."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing", path=path) from None
    except OSError as error:
        raise ConversionError(f"{path}: cannot read ({os.strerror(error.errno) if error.errno else error})",
                              path=path) from None
    require(stat.S_ISREG(info.st_mode), f"{path}: not a regular file", path=path)
    return info.st_size


def read_bytes(path, limit):
    """The bytes of a regular file of at most `limit` bytes. Opened without blocking and checked on the
    open descriptor, so a FIFO or device swapped in after a check cannot hang or flood the reader."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConversionError(f"{path}: missing", path=path) from None
    except OSError as error:
        raise ConversionError(f"{path}: cannot read ({os.strerror(error.errno) if error.errno else error})",
                              path=path) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        require(stat.S_ISREG(info.st_mode), f"{path}: not a regular file", path=path)
        require(info.st_size <= limit, f"{path}: {info.st_size} bytes, more than the {limit} bytes allowed", path=path)
        data = handle.read(limit + 1)
    require(len(data) <= limit, f"{path}: more than the {limit} bytes allowed", path=path)
    return data


def read_json(path, limit=MAX_JSON_BYTES):
    """A JSON file read with a size limit; anything unreadable or malformed is one ConversionError naming it."""
    try:
        return json.loads(read_bytes(path, limit))
    except RecursionError:
        raise ConversionError(f"{path}: not valid JSON (nested too deeply)", path=path) from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError, and ints too long to convert
        raise ConversionError(f"{path}: not valid JSON ({first_line(error)})", path=path) from None


def safe_relative_path(folder, name, where):
    """folder / name for a file name read from inside a checkpoint (`where`): a plain relative path
    without `..`, so it cannot leave the folder as written."""
    require(isinstance(name, str) and name and "\0" not in name,
            f"{where}: file name {name!r} is not a plain relative path")
    parts = PurePosixPath(name)
    require(not parts.is_absolute() and ".." not in parts.parts,
            f"{where}: file name {name!r} points outside {folder}")
    return Path(folder) / name


def is_count(value):
    """A positive int (JSON's true/false and 1e9 are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_weight_dtype(dtype, name, where):
    require(dtype in WEIGHT_DTYPES, f"{where}: {name} is stored as {dtype}, not a floating-point weight "
                                    f"({', '.join(str(d).removeprefix('torch.') for d in WEIGHT_DTYPES)})")
