"""argparse types shared by the plugins' flags, so a bad value stops the run at parse time with
argparse's own one-line error, before any process starts or any file is touched."""

import argparse


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def queue_size(text):
    """convert.py's --max-queue-size: 0 (or less) means unbounded, as multiprocessing.Queue reads it."""
    try:
        return max(0, int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1e9:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}")
    return value


def byte_size(text):
    """'5GB', '500MB', '10KiB' or a plain byte count, as transformers' max_shard_size; returns bytes."""
    upper = str(text).strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if upper.endswith(unit):
            upper, scale = upper[:-len(unit)], factor
            break
    else:
        scale = 1
    try:
        value = float(upper) * scale
    except ValueError:
        value = 0.0
    if not 1 <= value < 2**63:  # also refuses nan and inf: a file's size is at least a byte and fits an offset
        raise argparse.ArgumentTypeError(f"must be a size such as 5GB or 500MB, got {text!r}")
    return int(value)
