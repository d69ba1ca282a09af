"""Paths and flag values as users type them, through the real command line (issue 24, cases 4, 10, 14).

An existing, empty folder given as `.`, `./`, through `..`, with a trailing slash or as the working
directory's absolute path is converted into, by the HF and the Megatron savers alike. Paths the kernel
refuses (a symlink loop, a file where a folder should be, a name too long, a device) and sizes that are
no size (inf, nan, 0, negative, unknown units) are one `converter_core: error:` line naming the path or
flag and the problem, with nothing created. Paths recorded in the Megatron args are absolute."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter_core import flags
from helpers import assert_bit_identical, error_line, make_hf_model, read_config, write_tokenizer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paths") / "hf"
    make_hf_model(folder, num_hidden_layers=2)
    return folder


def run(*flags, cwd=None, loader="llama_hf", saver="llama_hf"):
    """The command line, as helpers.convert runs it, from the working directory `cwd`."""
    command = [sys.executable, "-m", "converter_core", "--model-type", "GPT", "--loader", loader, "--saver", saver,
               *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=cwd)


def succeeded(process):
    assert process.returncode == 0, f"conversion failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}"


def entries(folder):
    return sorted(p.name for p in Path(folder).iterdir())


def read_args(save_dir):
    state = torch.load(Path(save_dir) / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    return state["args"]


# ---- case 4: an existing, empty folder as --save-dir, however it is spelled ----

def spelled(spelling, folder):
    return {".": ".", "./": "./", "dotdot": f"../{folder.name}", "dotdot-slash": f"../{folder.name}/./",
            "absolute": str(folder), "absolute-slash": f"{folder}/"}[spelling]


@pytest.mark.parametrize("spelling", [".", "./", "dotdot-slash", "absolute-slash"])
def test_hf_saver_converts_into_the_empty_working_directory(tmp_path, source, spelling):
    folder = tmp_path / "empty"
    folder.mkdir()
    process = run("--load-dir", source, "--save-dir", spelled(spelling, folder), cwd=folder)
    succeeded(process)
    assert entries(folder) == ["config.json", "generation_config.json", "model.safetensors"]
    # the output folder took the working directory's place: a shell there must cd to see it, and is told so
    assert f"note: the output replaced the working directory; `cd {folder}` to see it" in process.stdout
    assert_bit_identical(source, folder)
    assert read_config(folder)["num_hidden_layers"] == 2
    assert entries(tmp_path) == ["empty"]  # no staged folder, no lock file left beside it


@pytest.mark.parametrize("saver, flags", [("hf", []), ("mcore", []), ("mcore", ["--ckpt-format", "torch_dist"]),
                                          ("megatron", [])])
def test_every_saver_converts_into_the_empty_working_directory(tmp_path, source, saver, flags):
    folder = tmp_path / "empty"
    folder.mkdir()
    process = run("--load-dir", source, "--save-dir", ".", *flags, cwd=folder, saver=saver)
    succeeded(process)
    assert ("replaced the working directory" in process.stdout) == (saver == "hf")
    if saver == "hf":
        assert_bit_identical(source, folder)
    else:
        assert (folder / "latest_checkpointed_iteration.txt").read_text() == "1"
        assert entries(folder) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
        if flags:
            assert (folder / "iter_0000001" / "metadata.json").is_file()
        else:
            assert (folder / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert entries(tmp_path) == ["empty"]


# ---- case 10: paths the kernel refuses, sizes that are no size: one line, nothing created ----

def refused(process, *expected, status=1):
    """The run's one error line, holding each of `expected`; nothing reached a side that writes."""
    line = error_line(process)
    assert process.returncode == status, process.stderr
    assert "(unexpected" not in line and "saver failed" not in line, line
    for text in expected:
        assert text in line, line
    return line


def test_symlink_loop_as_load_dir_or_save_dir(tmp_path, source):
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    before = entries(tmp_path)
    refused(run("--load-dir", tmp_path / "loop", "--save-dir", tmp_path / "out"),
            f"--load-dir {tmp_path / 'loop'}: Too many levels of symbolic links")
    refused(run("--load-dir", source, "--save-dir", tmp_path / "loop" / "out", saver="mcore"),
            f"--save-dir {tmp_path / 'loop' / 'out'}: Too many levels of symbolic links")
    refused(run("--load-dir", source, "--save-dir", tmp_path / "loop"),
            f"--save-dir {tmp_path / 'loop'}: is a symbolic link")
    assert entries(tmp_path) == before


@pytest.mark.parametrize("saver", ["llama_hf", "mcore"])
def test_save_dir_below_a_regular_file(tmp_path, source, saver):
    (tmp_path / "file").write_text("a file")
    refused(run("--load-dir", source, "--save-dir", tmp_path / "file" / "a" / "out", saver=saver),
            f"--save-dir {tmp_path / 'file' / 'a' / 'out'}: {tmp_path / 'file'} is not a folder")
    assert entries(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "a file"


def test_path_too_long(tmp_path, source):
    """5000 characters, as one name (over NAME_MAX) and as 25 names (over PATH_MAX); the line shows the path
    shortened."""
    long = "x" * 5000
    for flag, saver, path in (("--load-dir", "llama_hf", tmp_path / long), ("--save-dir", "mcore", tmp_path / long),
                              ("--save-dir", "llama_hf", tmp_path / "/".join([long[:200]] * 25))):
        flags = ["--load-dir", path, "--save-dir", tmp_path / "out"] if flag == "--load-dir" else \
                ["--load-dir", source, "--save-dir", path]
        line = refused(run(*flags, saver=saver), f"{flag} {tmp_path}/xxxxxxxxxx",
                       f"({len(str(path))} characters): File name too long")
        assert len(line) < 300, line
    assert entries(tmp_path) == []


@pytest.mark.parametrize("saver", ["llama_hf", "mcore"])
def test_dev_null_as_save_dir(source, saver):
    refused(run("--load-dir", source, "--save-dir", "/dev/null", saver=saver),
            "--save-dir /dev/null: exists and is not a folder")


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_max_shard_size_that_is_no_size(tmp_path, source, value):
    refused(run("--load-dir", source, "--save-dir", tmp_path / "out", "--max-shard-size", value),
            f"argument --max-shard-size: must be a size such as 5GB or 500MB, got {value!r}", status=2)
    assert entries(tmp_path) == []


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "infGB", "1e400", "1e30GB", "0", "0.4", "-5GB", "GB", "5XB",
                                   "5GBGB", "", " "])
def test_byte_size_refuses_what_is_no_size(value):
    with pytest.raises(argparse.ArgumentTypeError, match="must be a size such as 5GB"):
        flags.byte_size(value)


@pytest.mark.parametrize("value, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("10KiB", 10240), ("7", 7),
                                         (" 2gib ", 2 * 2**30), ("1.5KB", 1500)])
def test_byte_size_reads_sizes(value, size):
    assert flags.byte_size(value) == size


# ---- case 14: paths recorded in the Megatron args are absolute ----

def test_megatron_args_record_absolute_paths(tmp_path, source):
    write_tokenizer(tmp_path / "tokenizer", 96)
    work = tmp_path / "work"
    work.mkdir()
    load = os.path.relpath(source, work)
    succeeded(run("--load-dir", load, "--save-dir", "out", "--tokenizer-model", "../tokenizer", cwd=work,
                  saver="mcore"))
    args = read_args(work / "out")
    assert args.tokenizer_model == str(tmp_path / "tokenizer")
    assert args.hf_source_dir == str(source)
    succeeded(run("--load-dir", load, "--save-dir", "default", cwd=work, saver="mcore"))
    assert read_args(work / "default").tokenizer_model == str(source)
