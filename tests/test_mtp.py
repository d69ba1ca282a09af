"""Multi-token prediction (DeepSeek-V3's num_nextn_predict_layers, megatron-core's mtp_num_layers) both
ways: a tiny DeepSeek-V3 made with transformers plus one MTP layer (layer num_hidden_layers, random,
made here) converts to Megatron-Core per-rank files (TP, PP with MTP on the last stage, EP) and
torch_dist; megatron-core loads each strictly and gives transformers' logits, its MTP block gives the
logits of DeepSeek's MTP computation written below over transformers' own decoder layer, and the way
back to HF is bit-exact with the same config.json."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from dist_harness import dist_logits
from helpers import BASE, assert_bit_identical, convert, error_line, hf_logits, randomize, read_config, tokens_for
from mcore_harness import mcore_logits, save_mcore_checkpoint
from test_mla import make_model, to_hf, to_mcore

VOCAB = BASE["vocab_size"]
LAYERS = 2  # layer 0 dense, layer 1 MoE; the MTP layer (2) is built like the last one: MoE


def add_mtp_layer(folder, model, scratch):
    """Write an MTP layer into the saved model's weights as DeepSeek-V3's release holds it; returns it (a
    transformers decoder layer, with enorm, hnorm, eh_proj and shared_head.norm beside its own modules).
    It is the last layer of a model one layer deeper, so transformers writes it in its file names."""
    layers = model.config.num_hidden_layers
    config = type(model.config)(**dict(model.config.to_dict(), num_hidden_layers=layers + 1))
    torch.manual_seed(5)
    deeper = transformers.AutoModelForCausalLM.from_config(config).eval()
    layer = deeper.model.layers[layers]
    hidden, eps, norm = config.hidden_size, config.rms_norm_eps, type(model.model.norm)  # the family's RMSNorm
    layer.enorm, layer.hnorm = norm(hidden, eps), norm(hidden, eps)
    layer.eh_proj = torch.nn.Linear(2 * hidden, hidden, bias=False)
    layer.shared_head = torch.nn.Module()
    layer.shared_head.norm = norm(hidden, eps)
    randomize(layer, 7)
    with torch.no_grad():
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts,
                                                                 generator=torch.Generator().manual_seed(8)) * 0.1)
    deeper.save_pretrained(scratch)
    prefix = f"model.layers.{layers}."
    tensors = load_file(folder / "model.safetensors")
    tensors.update({name: value for name, value in load_file(scratch / "model.safetensors").items()
                    if name.startswith(prefix)})
    tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return layer


def mtp_reference_logits(model, layer, tokens):
    """DeepSeek-V3's MTP at depth 1, as megatron-core (and vLLM's deepseek_mtp.py) runs it: position i joins
    the main model's last hidden state of token i (after its final norm) with the embedding of token i + 1
    (token 0 past the end), h = eh_proj([enorm(embedding); hnorm(hidden)]), then the transformer layer,
    shared_head.norm and the shared output layer."""
    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state
        following = torch.roll(tokens, -1, dims=-1)
        following[:, -1] = 0
        joined = torch.cat([layer.enorm(model.model.embed_tokens(following)), layer.hnorm(hidden)], dim=-1)
        hidden = layer.eh_proj(joined)
        positions = torch.arange(tokens.shape[1])[None]
        hidden = layer(hidden, position_embeddings=model.model.rotary_emb(hidden, positions), position_ids=positions)
        return model.lm_head(layer.shared_head.norm(hidden)).float()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, transformers model, MTP layer) of a tiny DeepSeek-V3 with num_nextn_predict_layers 1."""
    folder = tmp_path_factory.mktemp("mtp") / "hf"
    model = make_model(folder, num_hidden_layers=LAYERS, num_nextn_predict_layers=1)
    return folder, model, add_mtp_layer(folder, model, tmp_path_factory.mktemp("deeper"))


def test_tp2_logits_mtp_logits_and_bit_exact_back(source, tmp_path):
    folder, model, layer = source
    megatron = tmp_path / "mcore"
    to_mcore(folder, megatron, "--target-tensor-parallel-size", 2, "--saver-transformer-impl", "local")
    state = torch.load(megatron / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)
    assert state["args"].mtp_num_layers == 1
    assert state["model"]["mtp.layers.0.eh_proj.weight"].shape == (32, 128)  # [hidden, 2 x hidden] split by rows
    tokens = tokens_for(VOCAB)
    logits, mtp_logits = mcore_logits(megatron / "iter_0000001", tokens, mtp=True)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)
    torch.testing.assert_close(mtp_logits[0][..., :VOCAB], mtp_reference_logits(model, layer, tokens), atol=1e-4, rtol=0)
    to_hf(megatron, tmp_path / "back")
    assert_bit_identical(folder, tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(folder)


def test_ep2_logits_in_megatron_core(source, tmp_path):
    """EP 2: each EP rank's file holds half the experts of every MoE layer, the MTP layer's included;
    megatron-core run at EP 2 loads them strictly and gives both logits."""
    folder, model, layer = source
    to_mcore(folder, tmp_path / "ep", "--target-expert-parallel-size", 2, "--saver-transformer-impl", "local")
    tokens = tokens_for(VOCAB)
    logits, mtp_logits = mcore_logits(tmp_path / "ep" / "iter_0000001", tokens, mtp=True, ep=2)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)
    torch.testing.assert_close(mtp_logits[0][..., :VOCAB], mtp_reference_logits(model, layer, tokens), atol=1e-4, rtol=0)


def test_pipeline_and_expert_parallel_round_trip(source, tmp_path):
    """PP 2 x EP 2 with TransformerEngine names: the MTP layer (its experts split over EP) and a copy of the
    embeddings on the last stage only, as megatron-core keeps them; back to HF bit-exact."""
    folder = source[0]
    to_mcore(folder, tmp_path / "ranks", "--target-pipeline-parallel-size", 2, "--target-expert-parallel-size", 2)
    iteration = tmp_path / "ranks" / "iter_0000001"
    first = torch.load(iteration / "mp_rank_00_000_001" / "model_optim_rng.pt", weights_only=False)["model"]
    last = torch.load(iteration / "mp_rank_00_001_001" / "model_optim_rng.pt", weights_only=False)["model"]
    assert not any(key.startswith("mtp.") for key in first)
    assert "embedding.word_embeddings.weight" in last and "output_layer.weight" in last
    experts = {key for key in last if key.startswith("mtp.layers.0.transformer_layer.mlp.experts.")}
    assert "mtp.layers.0.transformer_layer.mlp.experts.local_experts.3.linear_fc1.weight" in experts
    assert not any(".local_experts.4." in key for key in experts)  # 8 experts, 4 per EP rank
    assert last["mtp.layers.0.eh_proj._extra_state"].dtype == torch.uint8  # a TransformerEngine linear's
    to_hf(tmp_path / "ranks", tmp_path / "back")
    assert_bit_identical(folder, tmp_path / "back")


def test_torch_dist_loads_strictly_with_mtp_and_back(source, tmp_path):
    folder, model, _ = source
    to_mcore(folder, tmp_path / "dist", "--ckpt-format", "torch_dist", "--saver-transformer-impl", "local")
    tokens = tokens_for(VOCAB)
    logits = dist_logits(tmp_path / "dist" / "iter_0000001", tokens, tp=1)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(model, tokens), atol=1e-4, rtol=0)
    to_hf(tmp_path / "dist", tmp_path / "back")
    assert_bit_identical(folder, tmp_path / "back")


def test_refusals_are_one_line_and_write_nothing(source, tmp_path):
    folder = source[0]
    process = convert("--loader", "hf", "--saver", "megatron", "--load-dir", folder, "--save-dir", tmp_path / "legacy",
                      ok=False)
    assert "mtp_num_layers cannot be written as legacy" in error_line(process)
    # a saver that does not declare it reads MTP messages (as Megatron's own) is never sent the model
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "saver_plain.py").write_text(
        "def add_arguments(parser):\n    pass\n\n\ndef save_checkpoint(queue, args):\n    queue.get()\n")
    env = dict(__import__("os").environ)
    env["PYTHONPATH"] = f"{tmp_path / 'plain'}:{env.get('PYTHONPATH', '')}"
    process = convert("--loader", "hf", "--saver", "plain", "--load-dir", folder, "--save-dir", tmp_path / "plain-out",
                      ok=False, env=env)
    assert "does not declare that it reads them" in error_line(process)
    # a loader that does not send the MTP layers its args count (as Megatron's own) is refused by our savers
    (tmp_path / "plain" / "loader_plain.py").write_text(
        "import torch\nfrom converter_core import plugin\n\n\ndef add_arguments(parser):\n    pass\n\n\n"
        "def load_checkpoint(queue, args):\n"
        "    margs = plugin.make_args(num_layers=1, hidden_size=8, ffn_hidden_size=16, num_attention_heads=2,\n"
        "                             num_query_groups=2, kv_channels=4, max_position_embeddings=16, norm_epsilon=1e-6,\n"
        "                             rotary_base=10000, vocab_size=8, params_dtype=torch.float32, mtp_num_layers=1)\n"
        "    md = plugin.make_metadata(margs, true_vocab_size=8)\n"
        "    del md.mtp_num_layers\n"
        "    queue.put(md)\n")
    process = convert("--loader", "plain", "--saver", "mcore", "--load-dir", folder, "--save-dir", tmp_path / "from-plain",
                      ok=False, env=env)
    assert "the model args say mtp_num_layers=1, the loader's metadata announces 0" in error_line(process)
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in folder.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    tensors = load_file(changed / "model.safetensors")
    tensors[f"model.layers.{LAYERS}.embed_tokens.weight"][3, 5] += 1
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    line = error_line(to_mcore(changed, tmp_path / "o1", ok=False))
    assert f"model.layers.{LAYERS}.embed_tokens.weight differs from model.embed_tokens.weight" in line
    config = json.loads((folder / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=2)))
    assert "num_hidden_layers is 2 plus 2 multi-token-prediction layer(s), but the weights hold layers 0..2" in \
        error_line(to_mcore(changed, tmp_path / "o2", ok=False))
    for out in ("legacy", "plain-out", "from-plain", "o1", "o2"):
        assert not (tmp_path / out).exists()


def test_weights_without_the_counted_layer_convert_without_it(source, tmp_path):
    """A release that dropped its MTP layer but kept num_nextn_predict_layers: converted without MTP, the
    config.json kept as it was."""
    folder, model, _ = source
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    (stripped / "config.json").write_text((folder / "config.json").read_text())
    tensors = {name: value for name, value in load_file(folder / "model.safetensors").items()
               if not name.startswith(f"model.layers.{LAYERS}.")}
    save_file(tensors, stripped / "model.safetensors", metadata={"format": "pt"})
    to_mcore(stripped, tmp_path / "mcore")
    args = torch.load(tmp_path / "mcore" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)["args"]
    assert args.mtp_num_layers is None
    to_hf(tmp_path / "mcore", tmp_path / "back")
    assert_bit_identical(stripped, tmp_path / "back")
    assert read_config(tmp_path / "back") == read_config(folder)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "back").num_nextn_predict_layers == 1


def test_a_checkpoint_megatron_core_made_to_torch_dist(tmp_path):
    """megatron-core's own model with an MTP layer (dense, Llama-shaped, no HF origin) read from its rank
    files and written as torch_dist: megatron-core loads that strictly (the MTP transformer layer's norms
    under the local spec's torch_dist names) and gives the model's own logits."""
    tokens = tokens_for(VOCAB)
    iter_dir, expected = save_mcore_checkpoint(tmp_path / "mcore", tokens=tokens, mtp_num_layers=1)
    convert("--loader", "mcore", "--saver", "mcore", "--load-dir", tmp_path / "mcore", "--save-dir", tmp_path / "dist",
            "--ckpt-format", "torch_dist", "--saver-transformer-impl", "local")
    logits = dist_logits(tmp_path / "dist" / "iter_0000001", tokens)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_a_checkpoint_megatron_core_made_converts_to_hf_with_its_mtp_layer(tmp_path):
    """megatron-core's own MLA MoE model with an MTP layer (no HF origin): written as DeepSeek-V3 with
    num_nextn_predict_layers 1, its MTP layer as layer num_hidden_layers (the copies of the embeddings and
    output layer beside it), transformers giving megatron-core's logits."""
    tokens = tokens_for(VOCAB)
    iter_dir, expected = save_mcore_checkpoint(
        tmp_path / "mcore", tokens=tokens, num_layers=2, num_attention_heads=4, norm_epsilon=1e-6,
        multi_latent_attention=True, qk_layernorm=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16,
        qk_pos_emb_head_dim=8, v_head_dim=16, rope_type="rope", num_experts=8, moe_router_topk=4,
        moe_ffn_hidden_size=32, moe_layer_freq=[0, 1], moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=32, moe_router_dtype="fp32",
        mtp_num_layers=1)
    to_hf(tmp_path / "mcore", tmp_path / "hf")
    config = read_config(tmp_path / "hf")
    assert (config["model_type"], config["num_nextn_predict_layers"]) == ("deepseek_v3", 1)
    written = load_file(tmp_path / "hf" / "model.safetensors")
    source = torch.load(f"{iter_dir}/mp_rank_00/model_optim_rng.pt", weights_only=False)["model"]
    assert torch.equal(written["model.layers.2.eh_proj.weight"], source["mtp.layers.0.eh_proj.weight"])
    assert torch.equal(written["model.layers.2.shared_head.head.weight"], written["lm_head.weight"])
    assert torch.equal(written["model.layers.2.embed_tokens.weight"], written["model.embed_tokens.weight"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    torch.testing.assert_close(hf_logits(model, tokens), expected[..., :VOCAB], atol=1e-4, rtol=0)
