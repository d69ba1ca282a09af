"""convert()'s typed keywords and options(loader, saver); the typed progress events (converter_core.events)
and the job's state they carry; the command line's --progress json with it."""

import importlib.util
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import converter_core
from converter_core import api, events
from helpers import convert, make_hf_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("options") / "hf"
    make_hf_model(folder, num_hidden_layers=3)
    return folder


@pytest.fixture(scope="module")
def typed_run(source, tmp_path_factory):
    """One conversion through the named keywords, its progress events recorded."""
    save_dir, seen = tmp_path_factory.mktemp("typed") / "mcore", []
    result = converter_core.convert("llama_hf", "mcore", source, save_dir, target_tensor_parallel_size=2,
                                    dtype="bf16", ckpt_format="torch", workers=1, progress=seen.append)
    return save_dir, result, seen


def test_options_lists_the_pairs_flags_typed():
    listed = {option.name: option for option in converter_core.options("llama_hf", "mcore")}
    tp = listed["target_tensor_parallel_size"]
    assert (tp.flag, tp.type, tp.default, tp.plugin, tp.role) == ("--target-tensor-parallel-size", int, None, "mcore",
                                                                  "saver")
    assert "TP size of the output" in tp.help
    fmt = listed["ckpt_format"]  # the mcore saver's own
    assert (fmt.type, fmt.default, fmt.choices, fmt.plugin) == (str, "torch", ("torch", "torch_dist"), "mcore")
    assert (listed["bf16"].type, listed["bf16"].default, listed["bf16"].plugin) == (bool, False, "llama_hf")
    assert (listed["checking"].type, listed["checking"].default, listed["checking"].role) == (bool, True, "core")
    assert (listed["stall_timeout"].type, listed["stall_timeout"].default) == (float, 600)
    assert not {"load_dir", "save_dir", "loader", "saver", "progress", "model_type"} & set(listed)
    assert converter_core.options("llama_hf", "mcore") == api.options("llama_hf", "mcore")
    assert "target_tensor_parallel_size" not in {o.name for o in converter_core.options("mcore", "llama_hf")}
    # Every flag the command line's --help shows for this pair, and no other, is listed.
    shown = subprocess.run([sys.executable, "-m", "converter_core", "--loader", "llama_hf", "--saver", "mcore", "--help"],
                           capture_output=True, text=True, check=True).stdout
    for option in listed.values():
        assert option.flag in shown, option


def test_named_keywords_give_what_the_flags_gave(typed_run, source, tmp_path):
    save_dir, result, _ = typed_run
    old = converter_core.convert("llama_hf", "mcore", source, tmp_path / "old", target_tensor_parallel_size=2,
                                 plugin_options={"bf16": True}, workers=1)
    assert result.files == old.files and len(result.files) == 3
    for name in result.files:
        assert (save_dir / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    assert converter_core.detect(save_dir).dtype == "bfloat16" and converter_core.detect(source).dtype == "float32"


@pytest.mark.parametrize("loader,saver,options,message", [
    ("llama_hf", "mcore", dict(dtype="fp32"), "dtype must be 'bf16' or 'fp16', got 'fp32'"),
    ("mcore", "llama_hf", dict(dtype="bf16"), "dtype: the mcore loader keeps the source's dtype"),
    ("llama_hf", "mcore", dict(ckpt_format="zarr"), "argument ckpt_format: invalid choice: 'zarr'"),
    ("llama_hf", "mcore", dict(stall_timeout=-1), "argument stall_timeout: must be a number of seconds"),
    ("llama_hf", "llama_hf", dict(target_tensor_parallel_size=2), "unknown option 'target_tensor_parallel_size'"),
    ("llama_hf", "mcore", dict(workers=2, plugin_options={"workers": 2}), "option 'workers' is given twice"),
    ("llama_hf", "mcore", dict(dtype="bf16", bf16=True), "option 'bf16' is given twice")])
def test_a_bad_value_names_the_keyword(tmp_path, source, loader, saver, options, message):
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert(loader, saver, source, tmp_path / "out", **options)
    assert (caught.value.role, caught.value.status) == ("arguments", 2)
    assert message in str(caught.value) and "--" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_plugins_own_error_names_the_keyword(tmp_path, source):
    """A saver's message that names a flag the caller gave as a keyword reads with the keyword."""
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "mcore", source, tmp_path / "out", plugin_options={"moe_grouped_gemm": True})
    assert caught.value.role == "saver" and "moe_grouped_gemm=True for a model without experts" in str(caught.value)


def test_progress_events_are_typed_dicts_with_the_jobs_state(typed_run):
    save_dir, result, seen = typed_run
    assert all(isinstance(e, dict) and isinstance(e, events.Event) for e in seen)
    assert [type(e) for e in seen if e["event"] in events.KINDS] == [events.KINDS[e["event"]] for e in seen
                                                                    if e["event"] in events.KINDS]
    for event in seen:  # every declared field is there, of its type
        for field, kind in typing.get_type_hints(type(event)).items():
            assert isinstance(getattr(event, field), kind) and getattr(event, field) is event[field], (field, event)
    with pytest.raises(AttributeError):
        seen[0].fraction  # a start event has no job state

    kinds = [e.event for e in seen]
    assert kinds[0] == "start" and kinds[-1] == "finish" and kinds.count("written") == seen[0].messages == 3 + 3
    job = [e for e in seen if isinstance(e, events.JobEvent)]
    fractions = [e.fraction for e in job]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] == 1.0
    written = [e for e in seen if e.event == "written"]
    assert written[-1].fraction == 1.0 and written[-1].eta_seconds == 0.0
    assert [e.bytes_done for e in written] == [sum(w.bytes for w in written[:n]) for n in range(1, len(written) + 1)]
    assert all(e.eta_seconds is None or e.eta_seconds >= 0 for e in job)
    finish = seen[-1]
    on_disk = sum(p.stat().st_size for p in save_dir.rglob("*") if p.is_file())
    assert finish.bytes == finish.bytes_done == on_disk == result.bytes
    assert (finish.files, finish.save_dir, finish.eta_seconds) == (len(result.files), str(save_dir), 0.0)
    assert finish.seconds == result.seconds


def test_progress_json_keeps_its_fields_and_adds_the_jobs(tmp_path, source):
    process = convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir",
                      tmp_path / "out", "--progress", "json")
    lines = [json.loads(line) for line in process.stdout.splitlines()]
    written = [e for e in lines if e["event"] == "written"]
    assert written and all({"name", "bytes", "count", "total", "fraction", "bytes_done", "seconds",
                            "eta_seconds"} <= set(e) for e in written)
    assert lines[-1]["event"] == "finish" and lines[-1]["fraction"] == 1.0
    assert {"save_dir", "files", "bytes", "seconds"} <= set(lines[-1])
    assert lines[-1]["bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_committed_api_reference_is_generated():
    """Regenerate docs/api.md with `python scripts/api_reference_doc.py` after changing options or events."""
    spec = importlib.util.spec_from_file_location("api_reference_doc", REPO / "scripts" / "api_reference_doc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = script.markdown()
    assert (REPO / "docs" / "api.md").read_text() == text, "docs/api.md is stale: run python scripts/api_reference_doc.py"
    assert " at 0x" not in text and str(REPO) not in text
    for name in ("target_tensor_parallel_size", "ckpt_format", "plugin_options", "WrittenEvent", "eta_seconds"):
        assert f"`{name}`" in text or f"{name}:" in text, name
