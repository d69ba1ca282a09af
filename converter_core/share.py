"""One job split over the ranks of torch.distributed: each rank's saver writes whole output files of its
own (so no two ranks write one file), records what rank 0 needs to finish (its pieces), and rank 0
writes the rest and commits once every rank has succeeded (docs/architecture.md, "Scale-out")."""

import dataclasses
import json
import os
import tempfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Share:
    rank: int          # 0 .. world - 1
    world: int
    job: str           # 8 characters of [a-z0-9], the same on every rank (names the staged folder)
    pieces_file: str   # where this rank's saver writes its pieces (JSON)

    def mine(self, units):
        """The keys of `units` (an ordered list of (key, size in bytes), the same on every rank) that
        this rank writes: largest first onto the least-loaded rank, ties to the earlier unit and the
        lower rank, so every rank computes the same assignment. A rank may get nothing."""
        return owners(units, self.world)[self.rank]


def owners(units, world):
    """Every rank's keys, each list in the order of `units`."""
    load = [0] * world
    given = [[] for _ in range(world)]
    order = sorted(range(len(units)), key=lambda index: (-units[index][1], index))
    for index in order:
        rank = min(range(world), key=lambda r: (load[r], r))
        load[rank] += units[index][1]
        given[rank].append(index)
    return [[units[index][0] for index in sorted(indices)] for indices in given]


def write_pieces(share, pieces):
    """Write this rank's pieces (anything JSON can hold) to share.pieces_file in one step."""
    path = Path(share.pieces_file)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(pieces, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_pieces(path):
    with open(path) as handle:
        return json.load(handle)


def of(args):
    """The Share on a saver's args, or None for an ordinary (single-process) run."""
    return getattr(args, "share", None)
