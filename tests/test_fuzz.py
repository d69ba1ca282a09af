"""Fuzzing every reader of untrusted input, with hypothesis, on real small files the converter made.

A tiny Llama is converted once per module into the three source formats (a sharded HF folder with its
index, a Megatron-Core per-rank torch checkpoint, a torch_dist checkpoint); each example copies one,
damages it (truncates, flips or inserts bytes, edits a safetensors header's length, dtypes, shapes,
offsets and keys, the index, config.json, the tracker, the pickled args, checkpoint_version, DCP's
.metadata, chunks and common.pt) and converts it to HF with converter_core.convert in this process
(0.1 s a run; the loader and saver are still child processes). The property:

- either it succeeds, and the output is bit for bit the conversion of a clean file holding what the
  damaged one says, read by an independent reader (safetensors, torch.load(weights_only=True), torch's
  own DCP reader) and written again by its own writer;
- or it fails with one line naming a file of the source, as bad input (not "unexpected"), nothing
  printed on stderr, nothing complete or staged left, no child process and no /dev/shm entry left.

A sample goes through the real command line too. CI runs a few dozen examples per reader,
derandomized; FUZZ_EXAMPLES=5000 runs that many per test, randomly (docs/reliability.md, Fuzzing)."""

import argparse
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import warnings
import zipfile

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import converter_core
from helpers import error_line, make_hf_model, read_safetensors_folder

LONG_RUN = int(os.environ.get("FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples):
    """`examples` per test in CI, derandomized (the same inputs every run); FUZZ_EXAMPLES random ones."""
    return settings(max_examples=LONG_RUN or examples, derandomize=not LONG_RUN, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large], print_blob=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The three source formats of one tiny Llama, each made by the converter: {kind: folder}."""
    root = tmp_path_factory.mktemp("fuzz")
    make_hf_model(root / "made", num_hidden_layers=2)
    converter_core.convert("llama_hf", "llama_hf", root / "made", root / "hf", max_shard_size="150KB")
    converter_core.convert("llama_hf", "mcore", root / "made", root / "mcore")
    converter_core.convert("llama_hf", "mcore", root / "made", root / "dist", ckpt_format="torch_dist")
    assert (root / "hf" / "model.safetensors.index.json").exists()
    return {"hf": root / "hf", "mcore": root / "mcore", "dist": root / "dist", "root": root}


LOADER = {"hf": "llama_hf", "mcore": "mcore", "dist": "mcore"}


class Example:
    """One damaged copy of a source, converted; check() asserts the property."""

    def __init__(self, sources, kind, work):
        self.kind, self.work = kind, work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        self.source = work / "src"
        shutil.copytree(sources[kind], self.source)
        self.output = work / "out"

    def file(self, name):
        """The source file `name` (for Megatron sources, inside the iteration folder)."""
        if self.kind == "hf" or name == "latest_checkpointed_iteration.txt":
            return self.source / name
        return self.source / "iter_0000001" / name

    def check(self, capfd):
        capfd.readouterr()
        shared_memory = set(os.listdir("/dev/shm"))
        before = {child.pid for child in psutil.Process().children(recursive=True)}  # e.g. a resource tracker
        try:
            converter_core.convert(LOADER[self.kind], "llama_hf", self.source, self.output)
        except converter_core.ConversionError as error:
            message = str(error)
            assert error.kind == "input" and "\n" not in message and "(unexpected;" not in message, message
            # names a file of the source, or the output folder when the saver cannot express what it read
            assert str(self.source) in message or str(self.output) in message, f"the line names no file: {message}"
            assert_nothing_complete(self.output)
        else:
            assert_equal_outputs(self.output, self.reference())
        finally:
            started = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
            _, alive = psutil.wait_procs(started, timeout=10)
            assert not alive, f"still running: {alive}"
            assert not ours(set(os.listdir("/dev/shm")) - shared_memory)
        captured = capfd.readouterr()
        assert not captured.err.strip(), captured.err

    def reference(self):
        """The converter's output for a clean source holding what the damaged one says: read by an
        independent reader, written by that format's own writer."""
        clean = self.work / "clean"
        if self.kind == "hf":
            clean.mkdir()
            shutil.copy(self.source / "config.json", clean)
            save_file(independent_hf_tensors(self.source), str(clean / "model.safetensors"), metadata={"format": "pt"})
        else:
            shutil.copytree(self.source, clean, ignore=shutil.ignore_patterns("*.pt", "*.distcp", ".metadata"))
            for path in self.source.rglob("*.pt"):
                torch.save(torch_load(path), clean / path.relative_to(self.source))
            if self.kind == "dist":
                resave_dcp(self.source / "iter_0000001", clean / "iter_0000001")
        converter_core.convert(LOADER[self.kind], "llama_hf", clean, self.work / "expected")
        return self.work / "expected"


def ours(entries):
    """The /dev/shm entries among `entries` that a process of this run may have left: torch's segments
    (torch_<pid>_...) of a process that is gone or is this one. Other developers' runs share this
    machine's /dev/shm, and their live processes' entries come and go meanwhile; our loader and saver
    are forked, so multiprocessing's named semaphores are unlinked as soon as they are made."""
    def alive_elsewhere(name):
        pid = name.split("_")[1]
        return pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid))
    return {name for name in entries if name.startswith("torch_") and not alive_elsewhere(name)}


def assert_nothing_complete(output):
    """No tracker, config.json or iteration folder in the output, no staged folder beside it."""
    if output.exists():
        assert not [p for p in output.rglob("*") if p.name in ("config.json", "latest_checkpointed_iteration.txt")
                    or p.name.startswith("iter_") or p.suffix == ".safetensors"], list(output.rglob("*"))
    assert not [p for p in output.parent.iterdir() if ".partial" in p.name], list(output.parent.iterdir())


def assert_equal_outputs(got, expected):
    configs = [json.dumps(json.loads((folder / "config.json").read_text()), sort_keys=True) for folder in (got, expected)]
    assert configs[0] == configs[1]
    a, b = read_safetensors_folder(got), read_safetensors_folder(expected)
    assert sorted(a) == sorted(b)
    for name in a:
        assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


def independent_hf_tensors(folder):
    """The tensors an HF folder's index names, read by the safetensors library itself."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    tensors = {}
    for name, file in index["weight_map"].items():
        with safe_open(str(folder / file), framework="pt") as handle:
            tensors[name] = handle.get_tensor(name).clone()
    return tensors


def torch_load(path):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def resave_dcp(folder, clean):
    """A torch_dist folder's tensors read by torch's DCP reader and written again by DCP's writer."""
    import torch.distributed.checkpoint as dcp
    warnings.filterwarnings("ignore", "torch.distributed is disabled")  # no process group: one process
    reader = dcp.FileSystemReader(str(folder))
    metadata = reader.read_metadata()
    state = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, dcp.metadata.TensorStorageMetadata):
            assert meta.size.numel() < 10**7, f"{key}: {list(meta.size)} accepted"
            state[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    dcp.load(state, storage_reader=reader, no_dist=True)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(clean), single_file_per_rank=True), no_dist=True)


# ---------------------------------------------------------------------------------------------------
# Damage: bytes

@st.composite
def byte_damage(draw, size, hot=()):
    """(operation, position, argument) on a file of `size` bytes; positions favour the `hot` ranges
    (headers, pickles, zip directories) where a reader makes decisions."""
    ranges = [(0, size - 1)] + [(lo, max(lo, min(hi, size - 1))) for lo, hi in hot if lo < size]
    lo, hi = draw(st.sampled_from(ranges))
    position = draw(st.integers(lo, hi))
    operation = draw(st.sampled_from(["flip", "flip", "set", "truncate", "insert", "delete"]))
    argument = draw(st.binary(min_size=1, max_size=8) if operation in ("set", "insert") else st.integers(1, 255))
    return operation, position, argument


def apply_bytes(path, damage):
    operation, position, argument = damage
    data = bytearray(path.read_bytes())
    if operation == "flip":
        data[position] ^= argument
    elif operation == "set":
        data[position:position + len(argument)] = argument
    elif operation == "truncate":
        del data[position:]
    elif operation == "insert":
        data[position:position] = argument
    else:
        del data[position:position + argument]
    path.write_bytes(bytes(data))


def zip_hot_ranges(path):
    """The pickle record and the directory at the end of a torch.save zip: (first, last) byte ranges."""
    with zipfile.ZipFile(path) as archive:
        records = [info for info in archive.infolist() if info.filename.endswith("data.pkl")]
        end = max(info.header_offset + info.compress_size + 200 for info in archive.infolist())
    size = path.stat().st_size
    return [(r.header_offset, r.header_offset + r.compress_size + 100) for r in records] + [(min(end, size - 1), size - 1),
                                                                                           (size - 200, size - 1)]


# Values a field of JSON or of the pickled args may be given.
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.sampled_from([0, 2**31, 2**63, 10**30, -2**40]),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                   st.sampled_from(["4", "nan", "llama", "RMSNorm", "LayerNorm", "../x", ""]),
                   st.lists(st.integers(-2, 200), max_size=3),
                   st.dictionaries(st.text(max_size=3), st.integers(-2, 200), max_size=2))


# ---------------------------------------------------------------------------------------------------
# Damage: structure

def safetensors_files(folder):
    return sorted(p.name for p in folder.glob("*.safetensors"))


def read_header(path):
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


@st.composite
def header_edit(draw, header):
    """An edit of one safetensors header: a tensor's dtype, shape, offsets or name, or the metadata."""
    names = sorted(name for name in header if name != "__metadata__")
    name = draw(st.sampled_from(names))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename", "delete", "duplicate", "metadata", "raw"]))
    if field == "dtype":
        return field, name, draw(st.sampled_from(["F16", "BF16", "F64", "F32", "I32", "I64", "U8", "BOOL",
                                                  "F8_E4M3", "F8_E5M2", "C64", "X", 3]))
    if field == "shape":
        shape = list(header[name]["shape"])
        edit = draw(st.sampled_from(["resize", "add", "drop", "swap", "value"]))
        if edit == "resize" and shape:
            shape[draw(st.integers(0, len(shape) - 1))] += draw(st.sampled_from([-1, 1, 64, -10**6, 2**40, 2**62]))
        elif edit == "add":
            shape.insert(draw(st.integers(0, len(shape))), draw(st.sampled_from([0, 1, 2])))
        elif edit == "drop" and shape:
            shape.pop()
        elif edit == "swap":
            shape.reverse()
        else:
            shape = draw(VALUES)
        return field, name, shape
    if field == "data_offsets":
        start, end = header[name]["data_offsets"]
        return field, name, draw(st.sampled_from([
            [start, end + draw(st.sampled_from([-4, -1, 1, 4, 2**40]))],
            [start + draw(st.sampled_from([-4, 1, 4])), end],
            [end, start], [start - 4, end - 4], [start + 4, end + 4], [0, end - start],
            [start, start], draw(VALUES)]))
    if field == "rename":
        return field, name, draw(st.sampled_from(names + ["", "x", name + ".extra", "model.layers.9.mlp.up_proj.weight"]))
    if field == "metadata":
        return field, name, draw(VALUES)
    if field == "raw":
        return field, name, draw(VALUES)
    return field, name, None


def apply_header_edit(path, edit, length_change):
    header, data = read_header(path)
    field, name, value = edit
    if field in ("dtype", "shape", "data_offsets"):
        header[name][field] = value
    elif field == "rename":
        header[value] = header.pop(name)
    elif field == "delete":
        del header[name]
    elif field == "duplicate":
        header[name + "_copy"] = dict(header[name])
    elif field == "metadata":
        header["__metadata__"] = value
    else:
        header[name] = value
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    length = max(0, len(encoded) + length_change) if abs(length_change) < 2**20 else length_change % 2**64
    path.write_bytes(length.to_bytes(8, "little") + encoded + data)


@st.composite
def json_edit(draw, document, keys=None):
    """Set, delete or retype one field of a JSON object (or replace the document)."""
    keys = sorted(document) if keys is None else keys
    operation = draw(st.sampled_from(["set", "set", "set", "delete", "document"]))
    if operation == "document":
        return operation, None, draw(VALUES)
    return operation, draw(st.sampled_from(keys)), draw(VALUES)


def apply_json_edit(document, edit):
    operation, key, value = edit
    if operation == "document":
        return value
    if operation == "delete":
        document.pop(key, None)
    else:
        document[key] = value
    return document


# ---------------------------------------------------------------------------------------------------
# The fuzz tests

@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_safetensors(sources, tmp_path, capfd, data):
    """Safetensors shards: their bytes, and their headers' length, dtypes, shapes, offsets and names."""
    example = Example(sources, "hf", tmp_path / "example")
    path = example.file(data.draw(st.sampled_from(safetensors_files(example.source)), "shard"))
    if data.draw(st.booleans(), "structured"):
        header, _ = read_header(path)
        edit = data.draw(header_edit(header), "edit")
        length_change = data.draw(st.sampled_from([0, 0, 0, -8, -1, 1, 8, 2**63, 2**64 - 1]), "length change")
        apply_header_edit(path, edit, length_change)
    else:
        header_length = int.from_bytes(path.read_bytes()[:8], "little")
        apply_bytes(path, data.draw(byte_damage(path.stat().st_size, [(0, 8 + header_length)]), "damage"))
    example.check(capfd)


@fuzz_settings(40)
@given(data=st.data())
def test_fuzz_hf_index_and_config(sources, tmp_path, capfd, data):
    """model.safetensors.index.json (its weight_map's names and files) and config.json, as JSON and as bytes."""
    example = Example(sources, "hf", tmp_path / "example")
    name = data.draw(st.sampled_from(["config.json", "model.safetensors.index.json"]), "file")
    path = example.file(name)
    if data.draw(st.booleans(), "structured"):
        document = json.loads(path.read_text())
        if name == "config.json":
            document = apply_json_edit(document, data.draw(json_edit(document), "edit"))
        elif data.draw(st.booleans(), "weight_map"):
            weight_map = document["weight_map"]
            operation, key, value = data.draw(json_edit(weight_map), "edit")
            value = data.draw(st.sampled_from(sorted(set(weight_map.values())) + ["missing.safetensors", "../x",
                                                                                "/etc/passwd", value]), "file")
            document["weight_map"] = apply_json_edit(weight_map, (operation, key, value))
        else:
            document = apply_json_edit(document, data.draw(json_edit(document), "edit"))
        path.write_text(json.dumps(document))
    else:
        apply_bytes(path, data.draw(byte_damage(path.stat().st_size), "damage"))
    example.check(capfd)


ARGS_FIELDS = ["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
               "group_query_attention", "kv_channels", "vocab_size", "padded_vocab_size", "max_position_embeddings",
               "seq_length", "tensor_model_parallel_size", "pipeline_model_parallel_size", "num_experts",
               "moe_layer_freq", "untie_embeddings_and_output_weights", "normalization", "swiglu",
               "position_embedding_type", "add_bias_linear", "add_qkv_bias", "qk_layernorm", "norm_epsilon",
               "rotary_base", "params_dtype", "make_vocab_size_divisible_by", "transformer_impl",
               "virtual_pipeline_model_parallel_size", "multi_latent_attention", "use_legacy_models", "hf_config_json"]


@st.composite
def state_edit(draw):
    """A change to a Megatron state: one args field (set or deleted), or a top-level entry."""
    where = draw(st.sampled_from(["args", "args", "args", "checkpoint_version", "iteration", "args object"]))
    value = draw(st.one_of(VALUES, st.sampled_from([torch.bfloat16, torch.int32, pathlib.PurePosixPath("x")])))
    field = draw(st.sampled_from(ARGS_FIELDS)) if where == "args" else None
    return where, field, value, draw(st.booleans())


def apply_state_edit(path, edit):
    where, field, value, delete = edit
    state = torch.load(path, weights_only=False)  # our own file, made by the fixture
    if where == "args" and delete:
        vars(state["args"]).pop(field, None)
    elif where == "args":
        setattr(state["args"], field, value)
    elif where == "args object":
        state["args"] = value if not isinstance(value, pathlib.PurePath) else argparse.Namespace(x=value)
    elif delete:
        state.pop(where, None)
    else:
        state[where] = value
    torch.save(state, path)


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_rank_file_and_tracker(sources, tmp_path, capfd, data):
    """A per-rank checkpoint: model_optim_rng.pt's bytes (the pickle and zip directory favoured), its args
    Namespace and top-level entries (checkpoint_version, iteration), and the tracker file."""
    example = Example(sources, "mcore", tmp_path / "example")
    target = data.draw(st.sampled_from(["bytes", "bytes", "state", "tracker"]), "target")
    path = example.file("mp_rank_00/model_optim_rng.pt")
    if target == "bytes":
        apply_bytes(path, data.draw(byte_damage(path.stat().st_size, zip_hot_ranges(path)), "damage"))
    elif target == "state":
        apply_state_edit(path, data.draw(state_edit(), "edit"))
    else:
        tracker = example.file("latest_checkpointed_iteration.txt")
        tracker.write_bytes(data.draw(st.one_of(st.binary(max_size=20), st.text(max_size=20).map(str.encode),
                                                st.sampled_from([b"1\n", b" 1 ", b"01", b"release", b"2", b"0",
                                                                 b"9" * 13, b"1e0"])), "tracker"))
    example.check(capfd)


@st.composite
def metadata_edit(draw, metadata):
    """A change to DCP's .metadata: a tensor's size, dtype or a chunk's offsets and sizes, or a storage
    entry's file, byte offset or length."""
    import torch.distributed.checkpoint as dcp
    tensors = sorted(k for k, v in metadata.state_dict_metadata.items()
                     if isinstance(v, dcp.metadata.TensorStorageMetadata))
    key = draw(st.sampled_from(tensors))
    field = draw(st.sampled_from(["size", "dtype", "chunk offsets", "chunk sizes", "relative_path", "offset",
                                  "length", "drop chunk", "drop storage"]))
    number = draw(st.sampled_from([-1, 1, 7, 64, 2**40]))
    return key, field, number, draw(st.sampled_from(["../__0_0.distcp", "/dev/zero", "", "nope.distcp", "common.pt",
                                                     ".metadata"]))


def apply_metadata_edit(path, edit):
    import torch.distributed.checkpoint as dcp
    key, field, number, name = edit
    with open(path, "rb") as handle:
        metadata = pickle.load(handle)  # our own file, made by the fixture
    meta = metadata.state_dict_metadata[key]
    chunk = meta.chunks[0]
    storage = [index for index in metadata.storage_data if index.fqn == key]
    if field == "size":
        sizes = list(meta.size)
        sizes[number % len(sizes)] += number
        meta.size = torch.Size([max(0, s) for s in sizes])
    elif field == "dtype":
        meta.properties.dtype = [torch.int32, torch.bfloat16, torch.float64, torch.uint8, torch.bool][number % 5]
    elif field in ("chunk offsets", "chunk sizes"):
        values = list(chunk.offsets if field == "chunk offsets" else chunk.sizes)
        values[number % len(values)] = max(0, values[number % len(values)] + number)
        if field == "chunk offsets":
            chunk.offsets = torch.Size(values)
        else:
            chunk.sizes = torch.Size(values)
    elif field == "drop chunk":
        meta.chunks.pop()
    elif field == "drop storage":
        del metadata.storage_data[storage[0]]
    else:
        info = metadata.storage_data[storage[0]]
        if field == "relative_path":
            info.relative_path = name
        else:
            setattr(info, field, max(0, getattr(info, field) + number))
    assert isinstance(metadata, dcp.metadata.Metadata)
    with open(path, "wb") as handle:
        pickle.dump(metadata, handle)


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_torch_dist(sources, tmp_path, capfd, data):
    """A torch_dist checkpoint: .metadata (its bytes, and its tensors' sizes, dtypes, chunks and storage
    entries), the chunks in __0_0.distcp, and common.pt (bytes, args, checkpoint_version)."""
    example = Example(sources, "dist", tmp_path / "example")
    target = data.draw(st.sampled_from(["metadata", "metadata bytes", "chunks", "common", "common bytes"]), "target")
    if target == "metadata":
        path = example.file(".metadata")
        with open(path, "rb") as handle:
            metadata = pickle.load(handle)
        apply_metadata_edit(path, data.draw(metadata_edit(metadata), "edit"))
    elif target == "common":
        apply_state_edit(example.file("common.pt"), data.draw(state_edit(), "edit"))
    else:
        path = example.file({"metadata bytes": ".metadata", "chunks": "__0_0.distcp",
                             "common bytes": "common.pt"}[target])
        hot = zip_hot_ranges(path) if target == "common bytes" else []
        apply_bytes(path, data.draw(byte_damage(path.stat().st_size, hot), "damage"))
    example.check(capfd)


# ---------------------------------------------------------------------------------------------------
# Through the command line, and with the process-wide allow list widened

def run_cli(source, output, prelude="pass"):
    """The command line, as a user runs it; `prelude` runs first in the same process (what a training
    script that imports megatron.core does before converting)."""
    script = f"{prelude}; import runpy; runpy.run_module('converter_core', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", script, "--model-type", "GPT", "--loader", "mcore", "--saver",
                           "llama_hf", "--load-dir", str(source), "--save-dir", str(output)],
                          capture_output=True, text=True, timeout=120)


def test_rank_file_allow_list_ignores_the_process_wide_one(sources, tmp_path):
    """Importing megatron.core calls torch.serialization.add_safe_globals([PosixPath, ...]); a pickled
    PosixPath in a rank file's args must still be refused: the reader's allow list is its own."""
    example = Example(sources, "mcore", tmp_path / "example")
    rank_file = example.file("mp_rank_00/model_optim_rng.pt")
    state = torch.load(rank_file, weights_only=False)
    state["args"].data_cache_path = pathlib.PosixPath("/data/cache")
    torch.save(state, rank_file)
    widened = "import pathlib, torch; torch.serialization.add_safe_globals([pathlib.PosixPath])"
    process = run_cli(example.source, example.output, widened)
    line = error_line(process)
    assert process.returncode == 1 and str(rank_file) in line and "pathlib.PosixPath" in line, line
    assert_nothing_complete(example.output)


@pytest.mark.parametrize("version", ["3.0", None, [3]])
def test_checkpoint_version_that_is_not_a_number_is_one_line(sources, tmp_path, version):
    example = Example(sources, "mcore", tmp_path / "example")
    rank_file = example.file("mp_rank_00/model_optim_rng.pt")
    apply_state_edit(rank_file, ("checkpoint_version", None, version, False))
    line = error_line(run_cli(example.source, example.output))
    assert str(rank_file) in line and "checkpoint_version" in line, line
    assert_nothing_complete(example.output)


@settings(fuzz_settings(3), max_examples=max(3, LONG_RUN // 100))  # 2-3 s an example
@given(data=st.data())
def test_fuzz_sample_through_the_command_line(sources, tmp_path, data):
    """A few damaged rank files through the real command line: exit 1 and exactly one error line, or exit 0."""
    example = Example(sources, "mcore", tmp_path / "example")
    path = example.file("mp_rank_00/model_optim_rng.pt")
    apply_bytes(path, data.draw(byte_damage(path.stat().st_size, zip_hot_ranges(path)[:1]), "damage"))
    process = run_cli(example.source, example.output)
    if process.returncode:
        assert process.returncode == 1 and str(example.source) in error_line(process)
        assert_nothing_complete(example.output)
    else:
        assert_equal_outputs(example.output, example.reference())
