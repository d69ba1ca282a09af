"""Under an address-space limit (`ulimit -v`, RLIMIT_AS, common on shared clusters) a conversion needs
about what its processes import plus its files mapped once: a received tensor is mapped from the page it
starts on, not from the file's first byte (which made the address space grow with every tensor of a large
file: a 0.55 GB model needed more than 4 GiB). A limit too small for the model is one line that names
what could not be mapped and says to raise `ulimit -v`."""

import json
import os
import resource
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_bit_identical, error_line

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux's")

GiB = 1 << 30
VOCAB, HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 262144, 512, 512, 4, 2, 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A bf16 Llama of 0.55 GB in one safetensors file, nearly all of it the two vocabulary tables (written
    first), so every layer tensor lies past half a gigabyte into the file."""
    folder = tmp_path_factory.mktemp("address_space") / "hf"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):  # random rows, repeated: quick to make, and no two neighbouring rows alike
        block = torch.randn(min(shape[0], 4093), *shape[1:], generator=generator).to(torch.bfloat16)
        return block.repeat(-(-shape[0] // block.shape[0]), *([1] * (len(shape) - 1)))[:shape[0]].contiguous()

    kv = KV_HEADS * HIDDEN // HEADS
    weights = {"model.embed_tokens.weight": tensor(VOCAB, HIDDEN), "lm_head.weight": tensor(VOCAB, HIDDEN),
               "model.norm.weight": tensor(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights.update({p + "input_layernorm.weight": tensor(HIDDEN),
                        p + "post_attention_layernorm.weight": tensor(HIDDEN),
                        p + "self_attn.q_proj.weight": tensor(HIDDEN, HIDDEN),
                        p + "self_attn.k_proj.weight": tensor(kv, HIDDEN),
                        p + "self_attn.v_proj.weight": tensor(kv, HIDDEN),
                        p + "self_attn.o_proj.weight": tensor(HIDDEN, HIDDEN),
                        p + "mlp.gate_proj.weight": tensor(FFN, HIDDEN), p + "mlp.up_proj.weight": tensor(FFN, HIDDEN),
                        p + "mlp.down_proj.weight": tensor(HIDDEN, FFN)})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=HIDDEN, intermediate_size=FFN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16",
        hidden_act="silu")))
    return folder


@pytest.fixture(scope="module")
def imports():
    """The address space a process holding the converter's imports takes on this machine (torch, numpy's
    BLAS and their libraries), measured: the limits below are this plus what the model needs."""
    code = ("import torch, safetensors.torch, converter_core.api, converter_core.orchestrator\n"
            "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmPeak:')))")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1024


def convert_within(limit, *flags):
    """The command line run with its address space limited to `limit` bytes (children inherit it);
    two writer threads, so the threads' stacks and heaps do not depend on the machine's CPU count."""
    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    command = [sys.executable, "-m", "converter_core", "--model-type", "GPT", "--workers", "2", *map(str, flags)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=limited)


def test_a_model_converts_within_its_files_size_beyond_the_imports(tmp_path, source, imports):
    # Each file mapped once, each received tensor once: the imports, the 0.55 GB source in the loader
    # and the tensors in flight in the saver fitted in 1.2 GiB more (2 cores, 2 writers). Mapping each
    # received tensor from the file's first byte failed with 3.4 GiB more.
    limit = imports + 2 * GiB
    megatron, back = tmp_path / "mcore", tmp_path / "back"
    for flags in (("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron),
                  ("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron, "--save-dir", back)):
        process = convert_within(limit, *flags)
        assert process.returncode == 0, process.stderr[-3000:]
    assert_bit_identical(source, back)


def test_a_limit_too_small_for_the_model_is_one_line_saying_to_raise_it(tmp_path, source, imports):
    process = convert_within(imports + GiB // 3, "--loader", "llama_hf", "--saver", "mcore",
                             "--load-dir", source, "--save-dir", tmp_path / "out")
    line = error_line(process)
    assert process.returncode == 1, process.stderr
    assert "model.safetensors" in line and "ulimit -v" in line and "unexpected" not in line, line
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("error", [
    RuntimeError("unable to mmap 549467376 bytes from file </x/model.safetensors>: Cannot allocate memory (12)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 268435456 bytes. Error code 12 (Cannot allocate memory)"),
    OSError(12, "Cannot allocate memory", "/x/model.safetensors"), MemoryError()])
def test_out_of_memory_is_one_line_saying_what_and_to_raise_the_limit(error):
    from converter_core import orchestrator

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (64 * GiB, resource.getrlimit(resource.RLIMIT_AS)[1]))
    code = ("import pickle, sys; from converter_core import orchestrator\n"
            "print(orchestrator._describe(pickle.loads(sys.stdin.buffer.read())))")
    import pickle
    said = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(error), capture_output=True,
                          preexec_fn=limited, check=True).stdout.decode().strip()
    line, internal = eval(said)  # a (str, bool) tuple's repr
    assert not internal and line.startswith("out of memory: ") and "\n" not in line, line
    assert "this process may use 64 GiB of address space: raise `ulimit -v`" in line, line
    if not isinstance(error, MemoryError):
        assert "/x/model.safetensors" in line or "268435456 bytes" in line, line
    assert orchestrator._describe(error)[0].startswith("out of memory: ")


@pytest.mark.parametrize("margin", [0, 8, 16, 32, 64, 128])
def test_a_limit_near_the_imports_is_one_line_whatever_the_phase_it_hits(tmp_path, imports, margin):
    """Between what the imports need and what a tiny model needs, the limit strikes while torch imports,
    while plugins import, while the parent starts its thread and pipes, or in a side: each is one line and
    leaves no lock or staging (or the run fits and completes)."""
    from helpers import make_hf_model
    source = tmp_path / "hf"
    make_hf_model(source, num_hidden_layers=2)
    target = tmp_path / "out"
    process = convert_within(imports + margin * (1 << 20), "--loader", "llama_hf", "--saver", "llama_hf",
                             "--load-dir", source, "--save-dir", target)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    if process.returncode == 0:
        assert (target / "config.json").exists()
        return
    line = error_line(process)
    assert process.returncode == 1 and "ulimit -v" in line and "unexpected" not in line, process.stderr
    assert not target.exists()
