"""Savers split over ranks (converter_core.share), without torch.distributed: each rank of a job runs the real
conversion in turn with its own Share, then the saver plugin's finish_share gets every rank's pieces, as the
engine does on rank 0 (tests/test_scale_out.py runs the same under torchrun). The committed output must be
what one process writes: the same files and bytes (per-rank torch, HF shards), or for torch_dist the same
tensors (read by torch.distributed.checkpoint itself) and the same metadata entries."""

import contextlib
import filecmp
import json
import secrets
import string
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from converter_core import options, orchestrator, output
from converter_core.errors import ConversionError
from converter_core.formats import torch_dist
from converter_core.share import SKIPPED, Share, check_not_skipped, owners, read_pieces
from helpers import BASE, make_hf_model, randomize

ITERATION = "iter_0000001"


def argv(loader, saver, source, target, *flags):
    return ["--model-type", "GPT", "--loader", loader, "--saver", saver, "--load-dir", str(source),
            "--save-dir", str(target), *map(str, flags)]


def run(arguments, share=None):
    """One conversion in this process's orchestrator, as the CLI runs it; with `share`, one rank's part of a job.
    A rank's run takes no --save-dir lock (the engine's rank 0 holds it for the whole job): the patch below
    keeps orchestrator.run from taking one and from clearing the other ranks' staging meanwhile."""
    args, loader, saver = options.parse(arguments)
    args.share = share
    with _no_lock() if share else contextlib.nullcontext():
        orchestrator.run(args, loader, saver)
    return args, saver


@contextlib.contextmanager
def _no_lock():
    real = output.SaveDirLock
    output.SaveDirLock = lambda save_dir: None
    try:
        yield
    finally:
        output.SaveDirLock = real


def new_job():
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def run_ranks(arguments, world, pieces_dir, job=None, ranks=None):
    """Every rank of a job (or only `ranks`), one after another; returns (finisher's args, saver module, pieces)."""
    job = job or new_job()
    pieces, finisher = [], None
    for rank in range(world) if ranks is None else ranks:
        share = Share(rank, world, job, str(Path(pieces_dir) / f"pieces-{job}-{rank}.json"))
        args, saver = run(arguments, share)
        pieces.append(read_pieces(share.pieces_file))
        finisher = finisher or (args, saver)
    return finisher[0], finisher[1], pieces


def shared_run(arguments, world, pieces_dir):
    args, saver, pieces = run_ranks(arguments, world, pieces_dir)
    assert args.share.rank == 0
    saver.finish_share(args, pieces)
    return pieces


def files_of(folder):
    folder = Path(folder)
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


def assert_same_files(expected, got):
    assert files_of(got) == files_of(expected)
    for name in files_of(expected):
        assert filecmp.cmp(Path(expected) / name, Path(got) / name, shallow=False), name
    assert not [p.name for p in Path(got).parent.iterdir() if ".partial-" in p.name]  # nothing staged is left
    assert not [p.name for p in Path(got).iterdir() if ".partial-" in p.name]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("share") / "hf"
    make_hf_model(folder, "llama", dtype=torch.bfloat16, num_hidden_layers=6)
    return folder


@pytest.fixture(scope="module")
def tp2pp2(source):
    """The single-process HF -> mcore TP 2 x PP 2 output (also the source of the HF saver's cases)."""
    target = source.parent / "tp2pp2"
    run(argv("llama_hf", "mcore", source, target, "--target-tensor-parallel-size", 2,
             "--target-pipeline-parallel-size", 2))
    return target


def test_assignment_is_runs_of_neighbours_balanced_by_bytes():
    units = [("a", 10), ("b", 5), ("c", 5), ("d", 3), ("e", 1)]
    assert owners(units, 1) == [["a", "b", "c", "d", "e"]]
    assert owners(units, 2) == [["a"], ["b", "c", "d", "e"]]  # 10 and 14: "a", "b" would be 15
    assert owners(units, 3) == [["a"], ["b", "c"], ["d", "e"]]
    assert owners(units, 7) == [["a"], ["b"], ["c"], ["d"], ["e"], [], []]  # a rank for each, then none
    assert Share(1, 3, "abcd1234", "x").mine(units) == ["b", "c"]
    assert owners([], 2) == [[], []]
    for world in range(1, 9):  # every unit once, in order; no run larger than it must be
        given = owners([(str(i), size) for i, size in enumerate([7, 1, 1, 9, 2, 2, 2, 8, 3, 1])], world)
        assert [key for keys in given for key in keys] == [str(i) for i in range(10)] and len(given) == world


@pytest.mark.parametrize("world", [2, 3])
def test_per_rank_torch_files_are_byte_identical(source, tp2pp2, tmp_path, world):
    target = tmp_path / "mcore"
    pieces = shared_run(argv("llama_hf", "mcore", source, target, "--target-tensor-parallel-size", 2,
                             "--target-pipeline-parallel-size", 2), world, tmp_path)
    assert_same_files(tp2pp2, target)
    assert all(piece["files"] for piece in pieces)  # four files over two or three ranks: each wrote some
    assert (target / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_expert_parallel_files_are_byte_identical(tmp_path):
    config = transformers.MixtralConfig(**dict(BASE, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2))
    torch.manual_seed(0)
    randomize(transformers.AutoModelForCausalLM.from_config(config), 0).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    flags = ("--target-tensor-parallel-size", 2, "--target-expert-parallel-size", 2, "--saver-transformer-impl", "local")
    run(argv("hf", "mcore", tmp_path / "hf", tmp_path / "single", *flags))
    shared_run(argv("hf", "mcore", tmp_path / "hf", tmp_path / "shared", *flags), 3, tmp_path)
    assert_same_files(tmp_path / "single", tmp_path / "shared")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_hf_is_byte_identical(tp2pp2, tmp_path, world):
    single, target = tmp_path / "single", tmp_path / "shared"
    flags = ("--max-shard-size", 40000)
    run(argv("mcore", "llama_hf", tp2pp2, single, *flags))
    assert len(list(single.glob("*.safetensors"))) > world + 2  # several shards per rank
    pieces = shared_run(argv("mcore", "llama_hf", tp2pp2, target, *flags), world, tmp_path)
    assert_same_files(single, target)
    assert sorted(f for piece in pieces for f in piece["files"]) == sorted(p.name for p in single.glob("*.safetensors"))


def test_torch_dist_has_the_same_tensors_and_metadata(source, tmp_path):
    from torch.distributed import checkpoint as dcp

    single, target = tmp_path / "single", tmp_path / "shared"
    run(argv("llama_hf", "mcore", source, single, "--ckpt-format", "torch_dist"))
    shared_run(argv("llama_hf", "mcore", source, target, "--ckpt-format", "torch_dist"), 3, tmp_path)
    one, many = single / ITERATION, target / ITERATION
    assert sorted(p.name for p in many.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp",
                                                      "common.pt", "metadata.json"]
    for name in ("common.pt", "metadata.json"):
        assert filecmp.cmp(one / name, many / name, shallow=False), name
    assert (target / "latest_checkpointed_iteration.txt").read_text() == "1"
    expected, got = dcp.FileSystemReader(one).read_metadata(), dcp.FileSystemReader(many).read_metadata()
    assert list(got.state_dict_metadata) == list(expected.state_dict_metadata)
    assert got.state_dict_metadata == expected.state_dict_metadata  # dtypes, sizes and every chunk, in order
    assert [index for index in got.storage_data] == [index for index in expected.storage_data]
    assert {info.relative_path for info in got.storage_data.values()} == {"__0_0.distcp", "__1_0.distcp", "__2_0.distcp"}
    tensors = {key: meta for key, meta in expected.state_dict_metadata.items()
               if isinstance(meta, dcp.metadata.TensorStorageMetadata)}
    loaded = []
    for folder in (one, many):  # DCP's own reader, one process, no process group
        state = {key: torch.empty(meta.size, dtype=meta.properties.dtype) for key, meta in tensors.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
            dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
        loaded.append(state)
    for key in tensors:
        assert torch.equal(loaded[0][key].view(torch.uint8), loaded[1][key].view(torch.uint8)), key


def test_a_world_larger_than_the_files(source, tmp_path):
    """One safetensors file and three ranks: two own nothing, write nothing, and still succeed."""
    single, target = tmp_path / "single", tmp_path / "shared"
    run(argv("llama_hf", "llama_hf", source, single))
    pieces = shared_run(argv("llama_hf", "llama_hf", source, target), 3, tmp_path)
    assert [piece["files"] for piece in pieces] == [["model.safetensors"], [], []]
    assert_same_files(single, target)


def test_finish_refuses_a_job_with_a_rank_missing(source, tmp_path):
    """finish_share checks that every planned file was written by some rank: one line, nothing committed."""
    target = tmp_path / "mcore"
    arguments = argv("llama_hf", "mcore", source, target, "--target-tensor-parallel-size", 2)
    args, saver, pieces = run_ranks(arguments, 2, tmp_path, ranks=[0])
    lost = dict(pieces[0], files=[])
    with pytest.raises(ConversionError, match="not the planned rank files"):
        saver.finish_share(args, [pieces[0], lost])
    assert not (target / ITERATION).exists() and not (target / "latest_checkpointed_iteration.txt").exists()


def test_remove_job_staging_removes_a_half_written_job(source, tp2pp2, tmp_path):
    """What a failed job staged (rank 0 done, the others never ran) is removed, for Megatron (staged inside
    --save-dir) and HF (beside it); another job's staging is left alone."""
    megatron, hf = tmp_path / "mcore", tmp_path / "hf"
    job = new_job()
    run_ranks(argv("llama_hf", "mcore", source, megatron, "--target-tensor-parallel-size", 2), 3, tmp_path, job, [0])
    run_ranks(argv("mcore", "llama_hf", tp2pp2, hf, "--max-shard-size", 40000), 3, tmp_path, job, [0])
    staged = [megatron / f".{ITERATION}.partial-{job}", tmp_path / f".hf.partial-{job}"]
    assert all(folder.is_dir() and any(folder.iterdir()) for folder in staged)
    other = tmp_path / ".hf.partial-zzzz9999"
    other.mkdir()
    assert sorted(output.remove_job_staging(megatron, job) + output.remove_job_staging(hf, job)) == sorted(map(str, staged))
    assert not any(folder.exists() for folder in staged) and other.is_dir()
    assert output.remove_job_staging(megatron, job) == []


def test_pieces_are_json(source, tmp_path):
    """What a rank hands over survives the trip as JSON (the engine gathers it between machines)."""
    pieces = shared_run(argv("llama_hf", "mcore", source, tmp_path / "dist", "--ckpt-format", "torch_dist"), 2,
                        tmp_path)
    assert json.loads(json.dumps(pieces)) == pieces
    assert pieces[1]["dist"]["state"] is None and pieces[0]["dist"]["state"]  # declarations: rank 0's only
    assert torch_dist.DistReader(tmp_path / "dist" / ITERATION).shape("embedding.word_embeddings.weight")[1] == 64


def test_a_placeholder_is_refused_where_it_is_needed():
    """The loader sends a layer its rank's saver said it does not need as a placeholder (no data); a saver
    that does need it refuses it in one line instead of writing it."""
    placeholder = {"name": "transformer layer 3", SKIPPED: True}
    with pytest.raises(ConversionError, match="the loader skipped transformer layer 3, which this rank writes"):
        check_not_skipped(dict(placeholder), True, "saver (out)")
    message = dict(placeholder)
    check_not_skipped(message, False, "saver (out)")
    assert message == {"name": "transformer layer 3"}
