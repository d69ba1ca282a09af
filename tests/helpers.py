"""Shared test helpers: tiny random HF models made with transformers, the converter's command line,
and exact comparisons of HF folders. Nothing here imports converter_core: tests judge it from outside."""

import configparser
import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # data the tests read, kept in the repository: fixtures/README.md

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

VARIANTS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {"sliding_window": 4096}),
    "qwen2": (transformers.Qwen2Config, {}),
    "tied": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "mqa": (transformers.LlamaConfig, {"num_key_value_heads": 1}),
    "mha": (transformers.LlamaConfig, {"num_key_value_heads": 4}),
    "llama31": (transformers.LlamaConfig, {"rope_theta": 10000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, "max_position_embeddings": 16384}),
}


def randomize(model, seed):
    """Weights with structure a wrong mapping would break: norms far from 1, biases non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * noise)
            else:
                parameter.copy_(0.05 * noise)
    return model


def make_hf_model(folder, variant="llama", dtype=torch.float32, seed=0, **overrides):
    """Save a tiny random HF model of `variant` to `folder`; returns the model (float32, eval)."""
    config_class, fields = VARIANTS[variant]
    config = config_class(**{**BASE, **fields, **overrides})
    torch.manual_seed(seed)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config), seed).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    model.save_pretrained(folder)
    return model.float()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def tokens_for(vocab_size, length=24, seed=1):
    return torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))


def convert(*flags, ok=True, timeout=240, env=None):
    """Run the converter's command line as a user would; returns the CompletedProcess."""
    command = [sys.executable, "-m", "converter_core", "--model-type", "GPT", *map(str, flags)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if ok:
        assert process.returncode == 0, f"conversion failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    return process


def error_line(process):
    """The failing run's single error line; asserts there is exactly one and no traceback."""
    assert process.returncode != 0
    assert "Traceback" not in process.stderr, process.stderr
    lines = [line for line in process.stderr.splitlines() if line.startswith("converter_core: error:")]
    assert len(lines) == 1, process.stderr
    return lines[0]


def read_safetensors_folder(folder):
    """{name: tensor} of every safetensors file in an HF folder."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                assert name not in tensors, f"{name} appears twice"
                tensors[name] = handle.get_tensor(name)
    return tensors


def assert_bit_identical(folder_a, folder_b):
    a, b = read_safetensors_folder(folder_a), read_safetensors_folder(folder_b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


def read_config(folder):
    return json.loads((Path(folder) / "config.json").read_text())


def edited_copy(source, folder, tensors=None, config=None):
    """A copy of the HF folder `source` (one model.safetensors) with its tensors and config.json changed in
    place by the functions given."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(source, folder)
    if tensors:
        state = load_file(folder / "model.safetensors")
        tensors(state)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if config:
        (folder / "config.json").write_text(json.dumps(config(read_config(folder))))
    return folder


def write_tokenizer(folder, size):
    """A word-level tokenizer.json of `size` tokens: enough for the converter to count the vocabulary."""
    from tokenizers import Tokenizer, models
    Path(folder).mkdir(parents=True, exist_ok=True)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(size)}, unk_token="t0")).save(str(Path(folder) / "tokenizer.json"))


def declared_plugins(kind):
    """The `kind` ('loader' or 'saver') plugin names the repository's packages declare as entry points (its
    setup.cfg and plugins/converter-phi3's, both installed by the test command), sorted."""
    names = set()
    for setup in (REPO / "setup.cfg", REPO / "plugins" / "converter-phi3" / "setup.cfg"):
        config = configparser.ConfigParser(interpolation=None)
        config.read(setup)
        declared = config["options.entry_points"].get(f"converter_core.{kind}s", "")
        names |= {line.split("=")[0].strip() for line in declared.splitlines() if line.strip()}
    return sorted(names)
