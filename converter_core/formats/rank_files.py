"""Megatron's per-rank checkpoint layout: the tracker file, iteration folders, mp_rank folders."""

import itertools
import os
import re
from pathlib import Path

from converter_core import output
from converter_core.errors import require, require_folder
from converter_core.formats.untrusted import read_bytes

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_[0-9]{2}(?:_[0-9]{3}){0,2}$")
_ITERATION = re.compile(r"[0-9]{1,12}")  # Megatron writes the number only; 12 digits is plenty


def iteration_dir_name(iteration):
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank, pp_rank, pp_size, ep_rank=0, ep_size=1):
    """Megatron-LM's folder name: mp_rank_TT, then _PPP only when PP > 1, then _EEE only when EP > 1."""
    name = f"mp_rank_{tp_rank:02d}"
    if pp_size > 1:
        name += f"_{pp_rank:03d}"
    return name + (f"_{ep_rank:03d}" if ep_size > 1 else "")


def read_tracker(load_dir):
    """(iteration, iteration folder) named by latest_checkpointed_iteration.txt; an iteration folder
    (iter_NNNNNNN or release) given directly is accepted too."""
    load_dir = Path(load_dir)
    require_folder(load_dir)
    tracker = load_dir / TRACKER
    if not os.path.lexists(tracker) and re.match(r"^(iter_[0-9]{1,12}|release)$", load_dir.name):
        return (0 if load_dir.name == "release" else int(load_dir.name[5:])), load_dir
    require(os.path.lexists(tracker), f"{tracker}: missing (not a Megatron checkpoint folder)", path=tracker)
    text = read_bytes(tracker, 4096).decode("ascii", errors="replace").strip()
    require(text == "release" or _ITERATION.fullmatch(text),
            f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    folder = load_dir / iteration_dir_name(text if text == "release" else int(text))
    require(folder.is_dir(), f"{folder}: missing, though {tracker} names it")
    return (0 if text == "release" else int(text)), folder


def first_rank_file(iteration_folder):
    """The rank file of TP, PP and EP rank 0 (the lowest mp_rank folder), whose args give the grid."""
    folders = _rank_folders(iteration_folder)
    require(folders, f"{iteration_folder}: no mp_rank_* folders (not a per-rank torch checkpoint)")
    return folders[0] / RANK_FILE


def holders(tp, ep, whole_experts):
    """(dense, experts): dense(t) is the (TP rank, EP rank) of the file read for dense TP shard t, experts(e)
    the list of those read for EP rank e's expert TP shards. Experts split like the dense MLP: every TP x EP
    file. Experts whole (expert TP 1): in megatron-core's rank order (tp-cp-ep-dp-pp, expert TP 1) rank r of
    a pipeline stage is TP rank r % TP and EP rank r % EP, and Megatron-LM writes from data-parallel rank 0
    (r < TP) and expert-data-parallel rank 0 (r < EP; before core_v0.18 from the latter only), so its files
    are (r % TP, r % EP) for r < max(TP, EP): dense shard t is in (t, t % EP), EP rank e's experts in
    (e % TP, e). Any other file (our saver writes them all) repeats those and is not read."""
    if whole_experts:
        return (lambda t: (t, t % ep)), (lambda e: [(e % tp, e)])
    return (lambda t: (t, 0)), (lambda e: [(t, e) for t in range(tp)])


def find_rank_files(iteration_folder, tp, pp, ep=1, whole_experts=False):
    """{(tp_rank, pp_rank, ep_rank): path} of the rank files `holders` reads from a TP x PP x EP checkpoint:
    each is there, and no rank folder lies outside the grid (a folder name alone cannot say whether _NNN is
    a PP or EP rank). The grid is walked only as far as the folders go: args may claim TP 10**30."""
    folder = Path(iteration_folder)
    for entry in _rank_folders(folder):
        require(_in_grid(entry.name, tp, pp, ep), f"{entry}: not a rank of this checkpoint (its args say TP {tp}, PP {pp}, EP {ep})")
        require(entry.is_dir(), f"{entry}: not a folder")
    dense, experts = holders(tp, ep, whole_experts)
    wanted = itertools.chain(map(dense, range(tp)), (pair for e in range(ep) for pair in experts(e)))
    grid = f"TP {tp}, PP {pp}, EP {ep}" + (", expert TP 1" if whole_experts else "")
    found = {}
    for t, e in wanted:  # stops at the first missing one
        for p in range(pp):
            path = folder / rank_dir_name(t, p, pp, e, ep) / RANK_FILE
            require(path.is_file(), f"{path}: missing rank file (checkpoint has {grid})", path=path)
            found[t, p, e] = path
    return dict(sorted(found.items()))


def _in_grid(name, tp, pp, ep):
    """Whether rank folder `name` is one of a TP x PP x EP grid's, without listing the grid."""
    numbers = [int(part) for part in name[len("mp_rank_"):].split("_")]
    if len(numbers) != 1 + (pp > 1) + (ep > 1):
        return False
    t, p, e = numbers[0], numbers[1] if pp > 1 else 0, numbers[-1] if ep > 1 else 0
    return t < tp and p < pp and e < ep and name == rank_dir_name(t, p, pp, e, ep)


def _rank_folders(iteration_folder):
    return sorted(entry for entry in Path(iteration_folder).iterdir() if _RANK_DIR.match(entry.name))


def write_tracker(save_dir, iteration, gate=None):
    """Written last and atomically: its presence is what marks a checkpoint complete. `gate`: the run's
    output.commit_gate(args)."""
    output.write_atomically(Path(save_dir) / TRACKER, str(iteration), gate)
