"""FP8 block-scaled sources, as DeepSeek-V3 (with its MTP layer) and Kimi-K2 (the kimi_k2 family) release them: float8_e4m3fn
weights with a float32 `<name>_scale_inv` per block (partial edge blocks; the block sizes read from
quantization_config). The loader dequantizes as DeepSeek's weight_dequant does, so megatron-core gives
transformers' logits of the dequantized model; the Megatron tensors are that dequantization bit for
bit; the way back writes it with config.json as released, less quantization_config."""

import json
import math
import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import converter_core

from helpers import (BASE, assert_bit_identical, convert, error_line, hf_logits, read_config, read_safetensors_folder,
                     tokens_for)
from mcore_harness import mcore_logits
from test_mla import VOCAB, make_model, to_hf, to_mcore
from test_mtp import add_mtp_layer, mtp_reference_logits

# 16 experts in 4 groups, top 2 groups, 4 experts a token; DeepSeek-V3's release has an MTP layer, Kimi-K2's none.
MOE = dict(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
MTP_LAYERS = {"deepseek_v3": 1, "kimi_k2": 0}
EXPERTS, TP = 16, 2
# Blocks with partial edge blocks (DeepSeek's [24, 16]: rows of 32, 64, 128, 160; Kimi's [16, 24]: rows of
# 24, columns of 16, 32, 64, 160), not square, so a scale read transposed is caught.
BLOCKS = {"deepseek_v3": [24, 16], "kimi_k2": [16, 24]}
# What a release quantizes: the projections; not embeddings, lm_head, norms, the router or its bias.
QUANTIZED = re.compile(r"_proj(_with_mqa)?\.weight$")
KIMI_AUTO_MAP = {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
# Kimi-K2's config.json fields as released (its sizes scaled down): remote code's names, old-style yarn.
KIMI = dict(model_type="kimi_k2", auto_map=KIMI_AUTO_MAP, torch_dtype="bfloat16", transformers_version="4.48.3",
            rope_theta=50000.0, rope_scaling={"beta_fast": 1.0, "beta_slow": 1.0, "factor": 4.0, "mscale": 1.0,
                                              "mscale_all_dim": 1.0, "original_max_position_embeddings": 64,
                                              "type": "yarn"},
            scoring_func="sigmoid", topk_method="noaux_tc", seq_aux=True, ep_size=1, moe_layer_freq=1,
            aux_loss_alpha=0.001)
NOT_IN_KIMI = ("dtype", "rope_parameters", "rope_interleave", "head_dim", "qk_head_dim", "output_router_logits")
REMOTE_CODE = ("configuration_deepseek.py", "modeling_deepseek.py")


def quantize(weight, block):
    """A release's block scaling: per block, scale = amax / 448 (float32) and weight / scale in float8."""
    rows, cols = weight.shape
    high, wide = block
    values = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    scales = torch.empty(math.ceil(rows / high), math.ceil(cols / wide), dtype=torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = weight[i * high:(i + 1) * high, j * wide:(j + 1) * wide].float()
            scales[i, j] = part.abs().max() / 448
            values[i * high:(i + 1) * high, j * wide:(j + 1) * wide] = (part / scales[i, j]).to(torch.float8_e4m3fn)
    return values, scales


def dequantized(values, scales, block, dtype=torch.bfloat16):
    """weight_dequant: each value times its block's scale, in float32; stored (rounded) as `dtype`."""
    every = scales.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:values.shape[0], :values.shape[1]]
    return (values.float() * every).to(dtype)


def write_release(folder, tensors, config):
    """Two shards and an index, as a release has them (a weight's scale may sit in the other shard)."""
    folder.mkdir(parents=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({name: tensors[name] for name in members}, folder / file, metadata={"format": "pt"})
    weight_map = {name: file for file, members in shards.items() for name in members}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


class Release:
    """A tiny FP8 release of `model_type` and the model it encodes (the dequantized weights, in bf16)."""

    def __init__(self, root, model_type):
        self.fp8, self.reference = root / "fp8", root / "dequantized"
        model = make_model(self.reference, torch.bfloat16, num_nextn_predict_layers=MTP_LAYERS[model_type], **MOE)
        self.mtp = add_bf16_mtp_layer(self.reference, model, root / "deeper") if MTP_LAYERS[model_type] else None
        self.block = block = BLOCKS[model_type]
        config = read_config(self.reference)
        if model_type == "kimi_k2":
            config = {key: value for key, value in config.items() if key not in NOT_IN_KIMI}
            config.update(KIMI)
        self.config = dict(config, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                                        "quant_method": "fp8", "weight_block_size": block})
        self.stored, self.tensors = {}, read_safetensors_folder(self.reference)  # the release's; the model's
        for name, tensor in list(self.tensors.items()):
            if QUANTIZED.search(name):
                values, scales = quantize(tensor, block)
                self.stored[name], self.stored[name + "_scale_inv"] = values, scales
                self.tensors[name] = dequantized(values, scales, block)
            else:
                self.stored[name] = tensor
        write_release(self.fp8, self.stored, self.config)
        for file in REMOTE_CODE if model_type == "kimi_k2" else ():
            (self.fp8 / file).write_text("# the release's remote code\n")
        # transformers reads the dequantized model as deepseek_v3 (it has no kimi_k2 class)
        (self.reference / "model.safetensors").unlink()
        save_file(self.tensors, self.reference / "model.safetensors", metadata={"format": "pt"})
        reference = {k: v for k, v in self.config.items() if k not in ("quantization_config", "auto_map")}
        (self.reference / "config.json").write_text(json.dumps(dict(reference, model_type="deepseek_v3")))
        self.model = transformers.AutoModelForCausalLM.from_pretrained(self.reference, dtype=torch.float32).eval()
        if self.mtp is not None:  # the MTP layer of the model the release encodes, with its dequantized weights
            self.mtp = dequantized_mtp_layer(self.mtp, self.tensors, reference, root / "deeper-dequantized")

    def released_config(self):
        return {key: value for key, value in self.config.items() if key != "quantization_config"}


MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # an MTP layer's copies of the model's tables


def add_bf16_mtp_layer(folder, model, scratch):
    """test_mtp's MTP layer, stored in bfloat16 like the rest of the release (the routing bias in float32)."""
    layer = add_mtp_layer(folder, model, scratch)
    tensors = load_file(folder / "model.safetensors")
    save_file({name: tensor if name.endswith("e_score_correction_bias") else tensor.to(torch.bfloat16)
               for name, tensor in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return layer


def dequantized_mtp_layer(layer, tensors, config, scratch):
    """`layer` (test_mtp's MTP layer) holding the dequantized weights in `tensors`: its decoder part read by
    transformers as the last layer of a model one layer deeper, its MTP parts copied."""
    prefix = f"model.layers.{BASE['num_hidden_layers']}."
    parts = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
    scratch.mkdir()
    save_file({name: tensor for name, tensor in tensors.items()
               if not name.startswith(prefix) or not name.endswith(parts + MTP_COPIES)},
              scratch / "model.safetensors", metadata={"format": "pt"})
    deeper = dict(config, model_type="deepseek_v3", num_hidden_layers=BASE["num_hidden_layers"] + 1,
                  num_nextn_predict_layers=0)
    (scratch / "config.json").write_text(json.dumps(deeper))
    decoder = transformers.AutoModelForCausalLM.from_pretrained(scratch, dtype=torch.float32).model.layers[-1]
    with torch.no_grad():
        for name in parts:
            layer.get_parameter(name).copy_(tensors[prefix + name].float())
    for name, module in decoder.named_children():
        setattr(layer, name, module)
    return layer.eval()


RELEASES = {}


def made(model_type, tmp_path_factory):
    """One Release of each model type for the whole module."""
    if model_type not in RELEASES:
        RELEASES[model_type] = Release(tmp_path_factory.mktemp(model_type), model_type)
    return RELEASES[model_type]


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def release(request, tmp_path_factory):
    return made(request.param, tmp_path_factory)


def megatron_slices(tensors, layer, tp_rank=0, tp=1, first_expert=0, local_experts=EXPERTS):
    """{local Megatron name: the dequantized HF tensor's part that rank holds} for the quantized tensors of
    `layer`: column-parallel weights split by rows, row-parallel by columns, SwiGLU as [gate_r; up_r]."""
    hf, megatron = f"model.layers.{layer}.", f"decoder.layers.{layer}."

    def rows(name):
        return tensors[hf + name].chunk(tp)[tp_rank]

    def columns(name):
        return tensors[hf + name].chunk(tp, dim=1)[tp_rank]

    def swiglu(hf_mlp, megatron_mlp):
        return {megatron_mlp + "linear_fc1.weight": torch.cat([rows(hf_mlp + "gate_proj.weight"),
                                                               rows(hf_mlp + "up_proj.weight")]),
                megatron_mlp + "linear_fc2.weight": columns(hf_mlp + "down_proj.weight")}

    attention = {"linear_q_down_proj": "q_a_proj", "linear_q_up_proj": "q_b_proj", "linear_kv_up_proj": "kv_b_proj",
                 "linear_kv_down_proj": "kv_a_proj_with_mqa"}
    expected = {f"{megatron}self_attention.{key}.weight": rows(f"self_attn.{name}.weight")
                for key, name in attention.items()}
    expected[megatron + "self_attention.linear_proj.weight"] = columns("self_attn.o_proj.weight")
    if layer == 0:  # first_k_dense_replace 1
        return dict(expected, **swiglu("mlp.", megatron + "mlp."))
    expected.update(swiglu("mlp.shared_experts.", megatron + "mlp.shared_experts."))
    for local in range(local_experts):
        expected.update(swiglu(f"mlp.experts.{first_expert + local}.", f"{megatron}mlp.experts.local_experts.{local}."))
    return expected


def assert_rank_holds(rank_file, release, **where):
    state = torch.load(rank_file, weights_only=False)["model"]
    for layer in range(BASE["num_hidden_layers"]):
        for name, tensor in megatron_slices(release.tensors, layer, **where).items():
            assert state[name].dtype == torch.bfloat16 and torch.equal(state[name], tensor), name
    if release.mtp is not None:  # the MTP layer's projection, split by rows like any column-parallel weight
        eh_proj = release.tensors[f"model.layers.{BASE['num_hidden_layers']}.eh_proj.weight"]
        expected = eh_proj.chunk(where["tp"])[where["tp_rank"]]
        assert torch.equal(state["mtp.layers.0.eh_proj.weight"], expected)


def test_megatron_core_logits_exact_tensors_and_back(release, tmp_path):
    """TP 2 x EP 2: rank (1, 1) holds its part of the dequantized weights bit for bit (experts 8..15); back
    to HF bit-exact with the released config.json less quantization_config (remote code copied);
    megatron-core run at TP 2 x EP 2 gives transformers' logits of the dequantized model (and the MTP
    layer's)."""
    megatron = tmp_path / "mcore"
    to_mcore(release.fp8, megatron, "--target-tensor-parallel-size", TP, "--target-expert-parallel-size", 2,
             "--saver-transformer-impl", "local")
    iteration = megatron / "iter_0000001"
    assert sorted(path.name for path in iteration.iterdir()) == [f"mp_rank_{t:02d}_{e:03d}" for t in range(TP)
                                                                 for e in range(2)]
    assert_rank_holds(iteration / "mp_rank_01_001" / "model_optim_rng.pt", release, tp_rank=1, tp=TP,
                      first_expert=EXPERTS // 2, local_experts=EXPERTS // 2)
    args = torch.load(iteration / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)["args"]
    assert json.loads(args.hf_config_json) == release.config  # as released; the HF saver drops what no longer holds
    to_hf(megatron, tmp_path / "back")
    assert_bit_identical(release.reference, tmp_path / "back")
    assert read_config(tmp_path / "back") == release.released_config()
    for file in REMOTE_CODE if release.config["model_type"] == "kimi_k2" else ():
        assert (tmp_path / "back" / file).read_bytes() == (release.fp8 / file).read_bytes()
    tokens = tokens_for(VOCAB)
    logits = mcore_logits(iteration, tokens, mtp=release.mtp is not None, ep=2)
    if release.mtp is not None:
        logits, mtp_logits = logits
        torch.testing.assert_close(mtp_logits[0][..., :VOCAB], mtp_reference_logits(release.model, release.mtp, tokens),
                                   atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[..., :VOCAB], hf_logits(release.model, tokens), atol=1e-4, rtol=0)


def test_hf_to_hf_in_float16(release, tmp_path):
    """Straight HF -> HF with --fp16: each product rounded once to float16 (the router bias stays float32);
    config.json as released less quantization_config, with the new dtype."""
    convert("--loader", "hf", "--saver", "hf", "--load-dir", release.fp8, "--save-dir", tmp_path / "hf", "--fp16")
    written = read_safetensors_folder(tmp_path / "hf")
    assert sorted(written) == sorted(release.tensors)
    for name, tensor in written.items():
        if name + "_scale_inv" in release.stored:
            expected = dequantized(release.stored[name], release.stored[name + "_scale_inv"], release.block,
                                   torch.float16)
        else:
            stored = release.stored[name]
            expected = stored if stored.dtype == torch.float32 else stored.to(torch.float16)
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), name
    dtype_key = "torch_dtype" if "torch_dtype" in release.config else "dtype"
    assert read_config(tmp_path / "hf") == dict(release.released_config(), **{dtype_key: "float16"})


def variant(release, folder, tensors=None, config=None):
    """The release in one file, with some tensors or config.json fields replaced (None: removed)."""
    def edited(original, changes):
        return {key: value for key, value in {**original, **(changes or {})}.items() if value is not None}
    folder.mkdir()
    save_file(edited(release.stored, tensors), folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(edited(release.config, config)))
    return folder


def test_bad_fp8_input_is_one_line(tmp_path_factory, tmp_path):
    release = made("deepseek_v3", tmp_path_factory)
    down, q_up = "model.layers.2.mlp.experts.5.down_proj.weight", "model.layers.1.self_attn.q_b_proj.weight"
    settings = release.config["quantization_config"]
    cases = [  # (tensors, config, the error line's end)
        ({down + "_scale_inv": None}, None,
         f"model.safetensors: {down} is stored as float8_e4m3fn without its scale {down}_scale_inv"),
        ({q_up + "_scale_inv": torch.ones(5, 2)}, None,
         f"model.safetensors: {q_up}_scale_inv has shape [5, 2], but {q_up} [96, 32] in blocks of [24, 16] "
         "needs [4, 2]"),
        (None, {"quantization_config": dict(settings, quant_method="awq")},
         "config.json: quantization_config.quant_method 'awq' is not supported (only fp8 block-scaled weights, "
         "which are dequantized)"),
    ]
    for index, (tensors, config, message) in enumerate(cases):
        source = variant(release, tmp_path / f"source{index}", tensors, config)
        line = error_line(to_mcore(source, tmp_path / f"out{index}", ok=False))
        assert line.endswith(message), line
        assert not (tmp_path / f"out{index}").exists()


def test_more_bad_fp8_input(tmp_path_factory, tmp_path):
    """Through the library: a scale without its weight, a scale not float32, a block size, fmt, scales
    without quantization_config."""
    release = made("deepseek_v3", tmp_path_factory)
    settings = release.config["quantization_config"]
    o_proj = "model.layers.0.self_attn.o_proj.weight"
    cases = [
        (None, {"quantization_config": None},
         "config.json: has no quantization_config, but the weights hold FP8 scales such as "),
        ({"model.layers.0.self_attn.q_proj.weight_scale_inv": torch.ones(1, 1)}, None,
         "model.layers.0.self_attn.q_proj.weight_scale_inv is a scale without its weight (there is no "
         "model.layers.0.self_attn.q_proj.weight)"),
        ({o_proj + "_scale_inv": release.stored[o_proj + "_scale_inv"].bfloat16()}, None,
         f"{o_proj}_scale_inv is stored as bfloat16, not float32"),
        (None, {"quantization_config": dict(settings, weight_block_size=[128])},
         "quantization_config.weight_block_size must be two positive integers, got [128]"),
        (None, {"quantization_config": dict(settings, weight_block_size=[16, 0])},
         "quantization_config.weight_block_size must be two positive integers, got [16, 0]"),
        (None, {"quantization_config": dict(settings, fmt="e5m2")},
         "quantization_config.fmt 'e5m2' is not supported (only e4m3)"),
    ]
    for index, (tensors, config, message) in enumerate(cases):
        source = variant(release, tmp_path / f"source{index}", tensors, config)
        with pytest.raises(converter_core.ConversionError) as caught:
            converter_core.convert("hf", "mcore", source, tmp_path / f"out{index}")
        assert message in str(caught.value), caught.value
        assert not (tmp_path / f"out{index}").exists()
