"""Megatron's per-rank checkpoint layout: the tracker file, iteration folders, mp_rank folders."""

import os
import re
from pathlib import Path

from converter_core import output
from converter_core.errors import require
from converter_core.formats.untrusted import read_bytes

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"^mp_rank_([0-9]{2})(?:_([0-9]{3}))?$")
_ITERATION = re.compile(r"[0-9]{1,12}")  # Megatron writes the number only; 12 digits is plenty


def iteration_dir_name(iteration):
    return "release" if iteration == "release" else f"iter_{int(iteration):07d}"


def rank_dir_name(tp_rank, pp_rank, pp_size):
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def read_tracker(load_dir):
    """(iteration, iteration folder) named by latest_checkpointed_iteration.txt; an iteration folder
    (iter_NNNNNNN or release) given directly is accepted too."""
    load_dir = Path(load_dir)
    require(load_dir.is_dir(), f"{load_dir}: no such checkpoint folder")
    tracker = load_dir / TRACKER
    if not os.path.lexists(tracker) and re.match(r"^(iter_[0-9]{1,12}|release)$", load_dir.name):
        return (0 if load_dir.name == "release" else int(load_dir.name[5:])), load_dir
    require(os.path.lexists(tracker), f"{tracker}: missing (not a Megatron checkpoint folder)")
    text = read_bytes(tracker, 4096).decode("ascii", errors="replace").strip()
    require(text == "release" or _ITERATION.fullmatch(text),
            f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
    folder = load_dir / iteration_dir_name(text if text == "release" else int(text))
    require(folder.is_dir(), f"{folder}: missing, though {tracker} names it")
    return (0 if text == "release" else int(text)), folder


def find_rank_files(iteration_folder):
    """{(tp_rank, pp_rank): path} for every rank file, checked to form a full TP x PP grid."""
    folder = Path(iteration_folder)
    found = {}
    with_pp = without_pp = False
    for entry in sorted(folder.iterdir()):
        match = _RANK_DIR.match(entry.name)
        if not match:
            continue
        require(entry.is_dir(), f"{entry}: not a folder")
        tp_rank, pp_rank = int(match.group(1)), int(match.group(2) or 0)
        with_pp |= match.group(2) is not None
        without_pp |= match.group(2) is None
        found[(tp_rank, pp_rank)] = entry / RANK_FILE
    require(found, f"{folder}: no mp_rank_* folders (not a per-rank torch checkpoint)")
    require(not (with_pp and without_pp), f"{folder}: mixes mp_rank_TT and mp_rank_TT_PPP folders")
    tp = max(t for t, _ in found) + 1
    pp = max(p for _, p in found) + 1
    check_grid(folder, tp, pp if with_pp else 1)
    return found, tp, pp


def check_grid(iteration_folder, tp, pp):
    """Every rank file of a TP x PP checkpoint exists."""
    for t in range(tp):
        for p in range(pp):
            path = Path(iteration_folder) / rank_dir_name(t, p, pp) / RANK_FILE
            require(path.is_file(), f"{path}: missing rank file (checkpoint has TP {tp}, PP {pp})")


def write_tracker(save_dir, iteration):
    """Written last and atomically: its presence is what marks a checkpoint complete."""
    output.write_atomically(Path(save_dir) / TRACKER, str(iteration))
