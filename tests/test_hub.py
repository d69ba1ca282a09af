"""Hugging Face Hub ids as --load-dir / load_dir / detect(): resolved from a Hugging Face cache made here
(models--org--name/blobs, snapshots/<sha> of links to them, refs/main), offline; nothing is downloaded."""

import filecmp
import hashlib
import os
import subprocess
import sys

import pytest

import converter_core
from helpers import error_line, make_hf_model, write_tokenizer

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """(HF_HUB_CACHE folder, the same model as a plain folder) for Hub id "org/tiny"."""
    root = tmp_path_factory.mktemp("hub")
    plain = root / "plain"
    make_hf_model(plain, num_hidden_layers=2)
    write_tokenizer(plain, 96)  # side files for --hf-reference-dir / --tokenizer-model
    repo = root / "cache" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / SHA).mkdir(parents=True)
    for path in plain.iterdir():  # the cache's layout: content-named blobs, linked from the snapshot
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        os.symlink(os.path.relpath(blob, repo / "snapshots" / SHA), repo / "snapshots" / SHA / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return root / "cache", plain


def run(cache_dir, *flags, cwd=None):
    env = dict(os.environ, HF_HUB_CACHE=str(cache_dir), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "converter_core", *map(str, flags)], capture_output=True,
                          text=True, timeout=240, env=env, cwd=cwd)


def assert_same_files(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert filecmp.cmpfiles(a, b, names, shallow=False)[0] == names


def test_hub_id_converts_as_its_folder(cache, tmp_path):
    cache_dir, plain = cache
    snapshot = cache_dir / "models--org--tiny" / "snapshots" / SHA
    before = {p.name: p.stat().st_mtime_ns for p in snapshot.iterdir()}
    hf_to_hf = ["--model-type", "GPT", "--loader", "llama_hf", "--saver", "llama_hf", "--save-dir"]
    for name, load_dir in (("plain", plain), ("main", "org/tiny"), ("pinned", f"org/tiny@{SHA}")):
        process = run(cache_dir, *hf_to_hf, tmp_path / name, "--load-dir", load_dir)
        assert process.returncode == 0, process.stderr
    assert_same_files(tmp_path / "plain", tmp_path / "main")
    assert_same_files(tmp_path / "plain", tmp_path / "pinned")
    assert {p.name: p.stat().st_mtime_ns for p in snapshot.iterdir()} == before  # the snapshot is only read

    detect = run(cache_dir, "detect", "org/tiny")
    assert detect.returncode == 0 and '"format": "hf"' in detect.stdout

    missing = run(cache_dir, *hf_to_hf, tmp_path / "none", "--load-dir", "org/nonesuch")
    assert error_line(missing) == (f"converter_core: error: loader failed: org/nonesuch: no such model folder, and not in "
                                   f"the Hugging Face cache ({cache_dir}) and HF_HUB_OFFLINE is set")
    assert not (tmp_path / "none").exists()
    wrong = run(cache_dir, "detect", f"org/tiny@{'f' * 40}")
    assert error_line(wrong).startswith(f"converter_core: error: org/tiny@{'f' * 40}: no such model folder, and not in")


def test_a_local_folder_named_like_the_id_wins(cache, tmp_path):
    cache_dir, plain = cache
    make_hf_model(tmp_path / "org" / "tiny", "qwen2", num_hidden_layers=3)
    process = run(cache_dir, "detect", "org/tiny", cwd=tmp_path)
    assert process.returncode == 0 and '"family": "qwen2"' in process.stdout


def test_the_api_takes_hub_ids(cache, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    cache_dir, plain = cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))  # read at its import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert converter_core.detect(f"org/tiny@{SHA}") == converter_core.detect(plain)
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.convert("llama_hf", "mcore", "org/gone", tmp_path / "out")
    assert (caught.value.role, caught.value.kind, caught.value.path) == ("loader", "input", "org/gone")
    assert str(caught.value).startswith("org/gone: no such model folder, and not in the Hugging Face cache")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.detect("org/tiny")
    assert str(caught.value) == "org/tiny: no such model folder; to read it from the Hugging Face Hub, " \
                                "pip install 'converter-core[hub]'"


def test_reference_and_tokenizer_folders_take_hub_ids(cache, tmp_path):
    """--hf-reference-dir and --tokenizer-model resolve a Hub id as --load-dir does: the output is the one the
    plain folder gives, its tokenizer copied from the snapshot; a missing id is one line, nothing written."""
    cache_dir, plain = cache
    process = run(cache_dir, "--model-type", "GPT", "--loader", "llama_hf", "--saver", "mcore", "--load-dir", plain,
                  "--save-dir", tmp_path / "mcore", "--tokenizer-model", "org/tiny")
    assert process.returncode == 0, process.stderr
    args = torch_file_args(tmp_path / "mcore")
    assert args.tokenizer_model == str(cache_dir / "models--org--tiny" / "snapshots" / SHA)
    to_hf = ["--model-type", "GPT", "--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "mcore"]
    for name, side in (("plain", plain), ("hub", "org/tiny")):
        process = run(cache_dir, *to_hf, "--save-dir", tmp_path / name, "--hf-reference-dir", side,
                      "--tokenizer-model", side)
        assert process.returncode == 0, process.stderr
    assert_same_files(tmp_path / "plain", tmp_path / "hub")
    assert (tmp_path / "hub" / "tokenizer.json").read_bytes() == (plain / "tokenizer.json").read_bytes()
    for flag in ("--hf-reference-dir", "--tokenizer-model"):
        missing = run(cache_dir, *to_hf, "--save-dir", tmp_path / "none", flag, "org/nonesuch")
        assert error_line(missing) == (f"converter_core: error: org/nonesuch: no such model folder, and not in the "
                                       f"Hugging Face cache ({cache_dir}) and HF_HUB_OFFLINE is set")
        assert not (tmp_path / "none").exists()


def torch_file_args(folder):
    from converter_core.formats import rank_files, torch_file
    _, iteration = rank_files.read_tracker(folder)
    return torch_file.load(rank_files.first_rank_file(iteration))["args"]
