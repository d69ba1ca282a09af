"""torch_dist checkpoints, read and written without Megatron: HF -> torch_dist loads with
megatron.core.dist_checkpointing at TP 1 and 2 with the HF logits; checkpoints written by megatron-core's
own dist_checkpointing.save convert to HF and to per-rank files; round trips are bit-exact; bad files fail cleanly."""

import os

import pytest
import torch
import transformers
from megatron.core.enums import ModelType

from dist_harness import dist_logits, save_dist_checkpoint
from helpers import (BASE, assert_bit_identical, convert, error_line, hf_logits, make_hf_model, read_config,
                     tokens_for)
from mcore_harness import mcore_logits

VOCAB = BASE["vocab_size"]


def hf_to_dist(source, target, *flags):
    convert("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", target,
            "--ckpt-format", "torch_dist", *flags)


@pytest.mark.parametrize("variant", ["llama", "tied", "qwen2"])
def test_hf_to_torch_dist_loads_in_megatron_core(tmp_path, variant):
    model = make_hf_model(tmp_path / "hf", variant)
    hf_to_dist(tmp_path / "hf", tmp_path / "dist", "--saver-transformer-impl", "local")
    iteration = tmp_path / "dist" / "iter_0000001"
    assert sorted(p.name for p in iteration.iterdir()) == [".metadata", "__0_0.distcp", "common.pt", "metadata.json"]
    tokens = tokens_for(VOCAB)
    expected = hf_logits(model, tokens)
    for tp in (1, 2):
        logits = dist_logits(iteration, tokens, tp=tp)
        torch.testing.assert_close(logits[..., :VOCAB], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tp", [1, 2])
def test_megatron_core_torch_dist_to_hf_and_per_rank(tmp_path, tp):
    tokens = tokens_for(VOCAB)
    _, expected = save_dist_checkpoint(tmp_path / "dist", tokens=tokens, tp=tp, num_layers=4, num_query_groups=2,
                                       model_type=ModelType.encoder_or_decoder)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "dist", "--save-dir", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert read_config(tmp_path / "hf")["vocab_size"] == VOCAB
    torch.testing.assert_close(hf_logits(model, tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)
    for target_tp, target_pp in [(1, 1), (2, 2), (1, 4)]:
        ranks = tmp_path / f"ranks-{target_tp}-{target_pp}"
        convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "dist", "--save-dir", ranks,
                "--target-tensor-parallel-size", target_tp, "--target-pipeline-parallel-size", target_pp,
                "--saver-transformer-impl", "local")
        logits = mcore_logits(ranks / "iter_0000001", tokens)
        torch.testing.assert_close(logits[..., :VOCAB], expected[..., :VOCAB], atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
def test_dist_to_ranks_to_dist_to_hf_is_bit_exact(tmp_path, impl):
    make_hf_model(tmp_path / "hf", "qwen2", dtype=torch.bfloat16)
    hf_to_dist(tmp_path / "hf", tmp_path / "dist", "--saver-transformer-impl", impl)
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "dist", "--save-dir", tmp_path / "ranks",
            "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2, "--saver-transformer-impl", impl)
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "ranks", "--save-dir", tmp_path / "dist2",
            "--ckpt-format", "torch_dist", "--saver-transformer-impl", impl)
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "dist2", "--save-dir", tmp_path / "back")
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(tmp_path / "hf")


def dist_checkpoint(tmp_path):
    make_hf_model(tmp_path / "hf")
    hf_to_dist(tmp_path / "hf", tmp_path / "dist")
    return tmp_path / "dist" / "iter_0000001"


def assert_fails_cleanly(tmp_path, source, expected):
    process = convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", source, "--save-dir", tmp_path / "out",
                      ok=False, timeout=60)
    line = error_line(process)
    for text in expected:
        assert text in line
    assert not (tmp_path / "out").exists()


def test_truncated_distcp(tmp_path):
    iteration = dist_checkpoint(tmp_path)
    data = iteration / "__0_0.distcp"
    os.truncate(data, data.stat().st_size * 2 // 3)
    assert_fails_cleanly(tmp_path, tmp_path / "dist", [str(data), "truncated"])


def test_missing_dcp_metadata(tmp_path):
    iteration = dist_checkpoint(tmp_path)
    os.remove(iteration / ".metadata")
    assert_fails_cleanly(tmp_path, tmp_path / "dist", [str(iteration / ".metadata"), "missing"])


def test_key_shape_disagrees_with_args(tmp_path):
    iteration = dist_checkpoint(tmp_path)
    common = torch.load(iteration / "common.pt", weights_only=False)
    common["args"].ffn_hidden_size = 128  # the weights were made with 160
    torch.save(common, iteration / "common.pt")
    assert_fails_cleanly(tmp_path, tmp_path / "dist", ["decoder.layers.mlp.linear_fc1.weight", "[4, 320, 64]", "[4, 256, 64]"])


def test_unsafe_dcp_metadata_is_refused(tmp_path):
    iteration = dist_checkpoint(tmp_path)
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle
    (iteration / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    assert_fails_cleanly(tmp_path, tmp_path / "dist", [".metadata", "refusing to unpickle posix.system"])
    assert not marker.exists()


def test_per_layer_keys_are_read_too(tmp_path):
    """Checkpoints with non-homogeneous layers keep `decoder.layers.{i}.` keys instead of stacking them;
    rewritten here with torch's own DCP writer from a stacked one."""
    import shutil
    import torch.distributed.checkpoint as dcp
    make_hf_model(tmp_path / "hf", dtype=torch.bfloat16)
    hf_to_dist(tmp_path / "hf", tmp_path / "dist", "--saver-transformer-impl", "local")
    stacked_dir = tmp_path / "dist" / "iter_0000001"
    metadata = dcp.FileSystemReader(str(stacked_dir)).read_metadata()
    tensors = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items() if hasattr(meta, "size")}
    dcp.load(tensors, checkpoint_id=str(stacked_dir), no_dist=True)
    per_layer = {}
    for key, tensor in tensors.items():
        if key.startswith("decoder.layers."):
            for i in range(tensor.shape[0]):
                per_layer[key.replace("decoder.layers.", f"decoder.layers.{i}.", 1)] = tensor[i].clone()
        else:
            per_layer[key] = tensor
    target = tmp_path / "per-layer" / "iter_0000001"
    dcp.save(per_layer, checkpoint_id=str(target), no_dist=True)
    for name in ("common.pt", "metadata.json"):
        shutil.copy(stacked_dir / name, target / name)
    (tmp_path / "per-layer" / "latest_checkpointed_iteration.txt").write_text("1")
    convert("--loader", "mcore", "--saver", "llama_hf", "--load-dir", tmp_path / "per-layer", "--save-dir", tmp_path / "back")
    assert_bit_identical(tmp_path / "hf", tmp_path / "back")


def test_metadata_is_what_pickling_dcps_own_objects_writes(tmp_path):
    """.metadata is written without importing torch.distributed.checkpoint, from stand-ins of its classes.
    Read back, it is DCP's real objects, and pickling those again writes the same opcodes and arguments.
    2468 entries make it span several pickle frames, whose boundaries the pure-Python pickler may place a
    few opcodes apart from the C pickler's; and a dict of a multiple of 1000 entries gets one more, empty,
    batch from the C pickler only (both unpickle alike), so the count is not one."""
    import pickle
    import pickletools

    from torch.distributed.checkpoint import metadata as dcp_metadata

    from converter_core.formats import torch_dist

    writer = torch_dist.DistWriter(tmp_path)
    for layer in range(1234):
        key = f"decoder.layers.{layer}.mlp.linear_fc1.weight"
        writer.declare(key, torch.bfloat16, (1, 4, 2))
        writer.write_chunk(key, (torch.ones(2, 2, dtype=torch.bfloat16), torch.zeros(2, 2, dtype=torch.bfloat16)),
                           (0, 0, 0))()
        name = f"decoder.layers.{layer}.self_attention.linear_proj._extra_state"
        writer.write_object(name, None)()
    writer.finish({"args": None})
    written = (tmp_path / ".metadata").read_bytes()
    assert len(written) > 3 * 65536
    metadata = pickle.loads(written)
    assert isinstance(metadata, dcp_metadata.Metadata)
    entry = metadata.state_dict_metadata["decoder.layers.7.mlp.linear_fc1.weight"]
    assert entry == dcp_metadata.TensorStorageMetadata(
        dcp_metadata.TensorProperties(dtype=torch.bfloat16), torch.Size([1, 4, 2]),
        [dcp_metadata.ChunkStorageMetadata(offsets=torch.Size([0, 0, 0]), sizes=torch.Size([1, 4, 2]))])
    index = dcp_metadata.MetadataIndex("decoder.layers.7.mlp.linear_fc1.weight", [0, 0, 0])
    assert metadata.storage_data[index].relative_path == "__0_0.distcp"

    def opcodes(data):
        return [(op.name, argument) for op, argument, _ in pickletools.genops(data) if op.name != "FRAME"]

    assert opcodes(pickle.dumps(metadata)) == opcodes(written)
