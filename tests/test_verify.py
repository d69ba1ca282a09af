"""verify: a tiny Llama as HF, as Megatron-Core TP 2 x PP 2 and as torch_dist holds the same tensors in
each pair; one value changed in one rank file (or in the HF safetensors) is named, with its size."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import converter_core
from helpers import convert, error_line, make_hf_model

DELTA = 0.375


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    make_hf_model(root / "hf", num_hidden_layers=4)
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", root / "hf", "--save-dir", root / "mcore",
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    convert("--loader", "llama_hf", "--saver", "mcore", "--ckpt-format", "torch_dist", "--load-dir", root / "hf",
            "--save-dir", root / "dist")
    return root


def verify_cli(*arguments):
    return subprocess.run([sys.executable, "-m", "converter_core", "verify", *map(str, arguments)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("a,b", [("hf", "mcore"), ("mcore", "dist"), ("dist", "hf")])
def test_conversions_are_identical(folders, a, b):
    result = converter_core.verify(folders / a, folders / b)
    assert result.identical and result.passed and result.max_abs_diff == 0
    names = [row.name for row in result.rows]
    assert names[0] == "embeddings / word embeddings" and names[-1] == "output layer / weight"
    assert "transformer layer 3 / mlp l1 weight" in names and len(names) == len(set(names))
    assert all(row.dtype_a == row.dtype_b == "float32" for row in result.rows)
    assert all(row.shape_a == row.shape_b for row in result.rows if row.rows_compared is None)
    if a == "hf" or b == "hf":  # Megatron pads the vocabulary (96 rows to 256 at TP 2); the true rows are compared
        table = result.rows[0]
        assert min(table.shape_a[0], table.shape_b[0]) == 96 < max(table.shape_a[0], table.shape_b[0])
        assert table.rows_compared == 96
    process = verify_cli(folders / a, folders / b)
    assert process.returncode == 0 and process.stdout.startswith(f"identical: {len(result.rows)} tensors"), process


def test_one_changed_value_is_named(folders, tmp_path):
    changed = tmp_path / "mcore"
    shutil.copytree(folders / "mcore", changed)
    rank_file = changed / "iter_0000001" / "mp_rank_01_000" / "model_optim_rng.pt"  # TP rank 1, layers 0 and 1
    state = torch.load(rank_file, weights_only=False)
    key = next(k for k in state["model"] if k.endswith("layers.1.mlp.linear_fc2.weight"))
    before = state["model"][key][5, 7].item()
    state["model"][key][5, 7] += DELTA
    expected = abs(state["model"][key][5, 7].double().item() - before)
    torch.save(state, rank_file)

    result = converter_core.verify(folders / "hf", changed)
    assert not result.identical and not result.passed and result.max_abs_diff == expected
    assert [(row.name, row.max_abs_diff) for row in result.differing()] == [
        ("transformer layer 1 / mlp l1 weight", expected)]
    process = verify_cli(folders / "hf", changed)
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert f"differs: transformer layer 1 / mlp l1 weight: max abs diff {expected:g}" in process.stdout
    assert converter_core.verify(changed, folders / "dist", atol=DELTA * 1.01).passed
    assert verify_cli(changed, folders / "dist", "--atol", DELTA * 1.01).returncode == 0
    assert verify_cli(changed, folders / "dist", "--atol", DELTA * 0.99).returncode == 1


def test_changed_hf_value_and_dtype(folders, tmp_path):
    changed = tmp_path / "hf"
    shutil.copytree(folders / "hf", changed)
    path = changed / "model.safetensors"
    tensors = load_file(path)
    before = tensors["model.norm.weight"][3].item()
    tensors["model.norm.weight"][3] -= DELTA
    expected = abs(tensors["model.norm.weight"][3].double().item() - before)
    save_file(tensors, path, metadata={"format": "pt"})
    result = converter_core.verify(folders / "dist", changed)
    assert [(row.name, row.max_abs_diff) for row in result.differing()] == [("final norm / weight", expected)]

    half = tmp_path / "bf16"  # bf16 values against their float32 source: not identical, compared by value
    convert("--loader", "llama_hf", "--saver", "mcore", "--bf16", "--load-dir", folders / "hf", "--save-dir", half)
    result = converter_core.verify(folders / "hf", half, atol=1.0)
    assert not result.identical and result.passed and 0 < result.max_abs_diff < 0.01
    assert {(row.dtype_a, row.dtype_b) for row in result.rows} >= {("float32", "bfloat16")}


def test_bad_input_is_one_line(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    line = error_line(verify_cli(folders / "hf", tmp_path / "empty"))
    assert str(tmp_path / "empty") in line
    small = tmp_path / "small"
    make_hf_model(small, num_hidden_layers=3)
    process = verify_cli(folders / "mcore", small)
    assert process.returncode == 1
    assert error_line(process) == (f"converter_core: error: {folders / 'mcore'} and {small} are not one model: "
                                   "layers 4 against 3")
    with pytest.raises(converter_core.ConversionError, match="not one model"):
        converter_core.verify(small, folders / "dist")


def test_a_failing_side_is_named(folders, tmp_path):
    """The second side's loader fails (a rank file missing): its own line, not the comparing side's."""
    broken = tmp_path / "mcore"
    shutil.copytree(folders / "mcore", broken)
    missing = broken / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt"
    missing.unlink()
    assert error_line(verify_cli(folders / "hf", broken)) == (
        f"converter_core: error: loader failed: {missing}: missing rank file (checkpoint has TP 2, PP 2, EP 1)")
    with pytest.raises(converter_core.ConversionError) as caught:
        converter_core.verify(broken, folders / "hf")
    assert (caught.value.role, caught.value.path) == ("loader", str(missing))


def test_logits_of_both_sides(folders, tmp_path):
    """--logits: the HF model and its TP 2 x PP 2 conversion (converted back to HF for transformers) give the
    same logits; one changed column of a weight gives a difference, said in the CLI's line."""
    same = converter_core.verify(folders / "hf", folders / "mcore", logits=True)
    assert same.identical and same.logits_tokens == 8 and same.logits_max_abs_diff < 1e-5
    changed = tmp_path / "hf"
    shutil.copytree(folders / "hf", changed)
    tensors = load_file(changed / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][:, 3] += DELTA
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    different = converter_core.verify(changed, folders / "hf", logits=True)
    assert not different.identical and different.logits_max_abs_diff > 1e-3
    process = verify_cli(folders / "hf", changed, "--logits")
    assert process.returncode == 1
    assert f"logits: max abs diff {different.logits_max_abs_diff:g} over 8 tokens (float32, transformers)" \
        in process.stdout.splitlines()
