"""The built-in example: make a tiny random Llama with transformers, convert it to Megatron-Core
(TP 2, PP 2) and back with the converter's command line, and check the result in transformers:
bit-identical tensors and the same logits. Run: python scripts/example.py [work folder]"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file


def run(*flags):
    command = [sys.executable, "-m", "converter_core", "--model-type", "GPT", *map(str, flags)]
    print("$", " ".join(command[1:]), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main():
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="converter-core-example-"))
    source, megatron, back = work / "llama-hf", work / "llama-mcore", work / "llama-hf-again"
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(source)
    run("--loader", "llama_hf", "--saver", "mcore", "--load-dir", source, "--save-dir", megatron,
        "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    run("--loader", "mcore", "--saver", "llama_hf", "--load-dir", megatron, "--save-dir", back)
    before, after = load_file(source / "model.safetensors"), load_file(back / "model.safetensors")
    identical = sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)
    tokens = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    with torch.no_grad():
        difference = (model(tokens).logits - reloaded(tokens).logits).abs().max().item()
    print(f"Megatron-Core checkpoint: {megatron}")
    print(f"tensors bit-identical after HF -> Megatron-Core (TP2, PP2) -> HF: {identical}")
    print(f"largest logit difference in transformers: {difference:.3g}")
    if not identical or difference != 0.0:
        sys.exit("example FAILED")
    print("example OK")


if __name__ == "__main__":
    main()
