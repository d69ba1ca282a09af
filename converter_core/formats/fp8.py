"""FP8 block-scaled Hugging Face weights, read as the floating-point weights they encode.

The layout block-scaled FP8 releases share: config.json has a `quantization_config`
{"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [bo, bi]}; each quantized 2-D weight is
stored as float8_e4m3fn next to a float32 `<name>_scale_inv` with one multiplier per block of bo rows
and bi columns (the last blocks may be partial), shape [ceil(rows / bo), ceil(cols / bi)]. Other
tensors (embeddings, norms, routers, biases) are stored as they are. Dequantizing is what the
releases' own reference kernel (weight_dequant in their inference code) does: each value times its
block's scale, in float32; the loader rounds that product once, to its output dtype.
"""

import math

import torch

from converter_core.errors import require
from converter_core.formats import hf
from converter_core.formats.untrusted import is_count

CONFIG_KEY = "quantization_config"
SCALE_SUFFIX = "_scale_inv"
FORMATS = {"e4m3": torch.float8_e4m3fn}  # quantization_config.fmt -> the weights' dtype
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantizing(weights, config, where):
    """`weights` (formats.hf.HFWeights) as a loader should see them: as they are when config.json (at
    `where`) has no quantization_config; for an FP8 block-scaled source, a Dequantized view, after every
    weight and scale is checked against the other from the headers (nothing is read yet)."""
    names = weights.names()
    if CONFIG_KEY not in config:
        scale = next((name for name in names if name.endswith(SCALE_SUFFIX)), None)
        require(scale is None, f"{where}: has no {CONFIG_KEY}, but the weights hold FP8 scales such as {scale} "
                               f"({weights.file_of.get(scale)})")
        return weights
    block, dtype = block_format(config[CONFIG_KEY], where)
    scales = {name.removesuffix(SCALE_SUFFIX): name for name in names if name.endswith(SCALE_SUFFIX)}
    for weight, scale in scales.items():
        file = weights.file_of[scale]
        require(weight in weights, f"{file}: {scale} is a scale without its weight (there is no {weight})")
        stored = weights.stored_dtype(weight)
        require(stored == dtype, f"{weights.file_of[weight]}: {weight} has a scale ({scale}) but is stored as "
                                 f"{_name(stored)}, not {_name(dtype)} as {CONFIG_KEY} says")
        require(weights.stored_dtype(scale) == torch.float32,
                f"{file}: {scale} is stored as {_name(weights.stored_dtype(scale))}, not float32")
        shape = weights.shape(weight)
        require(len(shape) == 2, f"{weights.file_of[weight]}: {weight} has shape {list(shape)}; only 2-D weights "
                                 "are block-scaled")
        blocks = [math.ceil(size / edge) for size, edge in zip(shape, block)]
        require(list(weights.shape(scale)) == blocks,
                f"{file}: {scale} has shape {list(weights.shape(scale))}, but {weight} {list(shape)} in blocks "
                f"of {list(block)} needs {blocks}")
    for name in names:
        if name not in scales and not name.endswith(SCALE_SUFFIX):
            require(weights.stored_dtype(name) not in FLOAT8,
                    f"{weights.file_of[name]}: {name} is stored as {_name(weights.stored_dtype(name))} without "
                    f"its scale {name}{SCALE_SUFFIX}")
    return Dequantized(weights, scales, block)


def block_format(settings, where):
    """(block size, float8 dtype) of a quantization_config; anything but FP8 block scaling is refused."""
    field = f"{where}: {CONFIG_KEY}"
    require(isinstance(settings, dict), f"{field} must be a JSON object, got {settings!r:.40}")
    method = settings.get("quant_method")
    require(method == "fp8", f"{field}.quant_method {method!r:.40} is not supported (only fp8 block-scaled "
                             "weights, which are dequantized)")
    fmt = settings.get("fmt", "e4m3")  # transformers' fine-grained FP8 configs leave it out
    require(fmt in FORMATS, f"{field}.fmt {fmt!r:.40} is not supported (only {', '.join(FORMATS)})")
    block = settings.get("weight_block_size")
    require(isinstance(block, list) and len(block) == 2 and all(map(is_count, block)),
            f"{field}.weight_block_size must be two positive integers, got {block!r:.40}")
    return tuple(block), FORMATS[fmt]


class Dequantized(hf.DecodedWeights):
    """HFWeights of an FP8 block-scaled folder seen as floating-point weights: the scales are not
    among the names, and a quantized weight is read as its float32 dequantization."""

    def __init__(self, weights, scales, block):
        super().__init__(weights, {name: weights.file_of[name] for name in scales}, set(scales.values()))
        self.scales, self.block = scales, block

    def decode(self, name):
        return dequantize(self.weights.stored(name), self.weights.stored(self.scales[name]), self.block)


def dequantize(weight, scale, block):
    """float8 `weight` [rows, cols] times the `scale` of its block (`block`: rows, cols), in float32: one
    band of block rows at a time, so nothing but the result is as large as the weight in float32."""
    high, wide = block
    result = torch.empty(weight.shape, dtype=torch.float32)
    for index, start in enumerate(range(0, weight.shape[0], high)):
        band = slice(start, start + high)
        torch.mul(weight[band].to(torch.float32), scale[index].repeat_interleave(wide)[:weight.shape[1]],
                  out=result[band])
    return result


def _name(dtype):
    return str(dtype).removeprefix("torch.")
