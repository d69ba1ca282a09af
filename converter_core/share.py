"""One job split over the ranks of torch.distributed: each rank's saver writes whole output files of its
own (so no two ranks write one file), records what rank 0 needs to finish (its pieces), and rank 0
writes the rest and commits once every rank has succeeded (docs/architecture.md, "Scale-out")."""

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from converter_core.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class Share:
    rank: int          # 0 .. world - 1
    world: int
    job: str           # 8 characters of [a-z0-9], the same on every rank (names the staged folder)
    pieces_file: str   # where this rank's saver writes its pieces (JSON)

    def mine(self, units):
        """The keys of `units` (an ordered list of (key, size in bytes), the same on every rank) that this
        rank writes: a run of neighbouring units, the runs balanced by bytes (owners). A rank may get none;
        rank 0 then warns, once, since those ranks only add start-up time."""
        every = owners(units, self.world)
        idle = sum(not keys for keys in every)
        if idle and self.rank == 0:
            from converter_core import protocol  # protocol imports this module
            protocol.report("warning", message=f"the output splits into {len(units)} part(s) for {self.world} ranks: "
                            f"{idle} rank(s) have nothing to write (ranks share whole files, torch_dist whole layers; "
                            "an HF output is split into more with --max-shard-size)")
        return every[self.rank]


def owners(units, world):
    """Every rank's keys: the units cut, in the order given, into at most `world` runs of neighbours whose
    largest holds as few bytes as possible (the smallest capacity for which filling each run up to it
    needs no more runs than ranks), each unit on a rank of its own where there are ranks enough; the ranks
    after the last run get none. In the order of the source and
    the output, each rank reads one stretch of the source, not bits of all of it. Every rank computes the
    same."""
    sizes = [size for _, size in units]

    def runs(capacity):
        cut, load = [[]], 0
        for index, size in enumerate(sizes):  # a new run when full, or when a rank is left for each unit left
            if cut[-1] and (load + size > capacity or len(sizes) - index <= world - len(cut)):
                cut.append([])
                load = 0
            cut[-1].append(index)
            load += size
        return cut

    low, high = max(sizes, default=0), sum(sizes)
    while low < high:  # the smallest capacity that `world` runs can hold
        middle = (low + high) // 2
        low, high = (low, middle) if len(runs(middle)) <= world else (middle + 1, high)
    given = [[units[index][0] for index in run] for run in runs(low)]
    return given + [[] for _ in range(world - len(given))]


def write_pieces(share, pieces):
    """Write this rank's pieces (anything JSON can hold) to share.pieces_file in one step."""
    _write_json(share.pieces_file, pieces)
    Path(_skipped_file(share)).unlink(missing_ok=True)


def _write_json(path, value):
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(value, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_pieces(path):
    with open(path) as handle:
        return json.load(handle)


# Layers a rank's saver does not need. Its loader would build them all (HF q/k/v grouped into QKV,
# experts stacked, FP8 or MXFP4 dequantized: reading and computing the whole model on every rank), so the
# saver, once it has planned its files, names the messages no file of its rank holds, and the loader sends
# those as placeholders: the right shapes, no data, marked SKIPPED. Only a message the loader builds after
# the saver has spoken is skipped; the saver refuses a placeholder for a message it needs.
SKIPPED = "skipped by the loader"  # the key that marks a placeholder message


def _skipped_file(share):
    return f"{share.pieces_file}.skip"


def announce_skipped(args, names):
    """Saver: the message names no file of this rank holds (nothing without a share)."""
    share = of(args)
    if share is not None:
        _write_json(_skipped_file(share), sorted(names))


_skipped = {}


def skipped(args, name):
    """Loader: whether the saver of this rank said it does not need message `name`."""
    share = of(args)
    if share is None:
        return False
    if share.pieces_file not in _skipped:
        try:
            _skipped[share.pieces_file] = set(read_pieces(_skipped_file(share)))
        except FileNotFoundError:  # not yet: the saver has not planned its files
            return False
    return name in _skipped[share.pieces_file]


def check_not_skipped(message, needed, where):
    """Saver: take the placeholder mark off a received message; refuse a placeholder this rank needs."""
    if message.pop(SKIPPED, False) and needed:
        raise ConversionError(f"{where}: the loader skipped {message.get('name')}, which this rank writes")


def of(args):
    """The Share on a saver's args, or None for an ordinary (single-process) run."""
    return getattr(args, "share", None)
