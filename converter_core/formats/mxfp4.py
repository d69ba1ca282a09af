"""MXFP4 Hugging Face weights, read as the bf16 weights transformers makes of them.

The layout MXFP4 releases use: config.json has a `quantization_config` {"quant_method": "mxfp4", ...};
a quantized tensor `<name>` is stored as `<name>_blocks` (uint8 [..., rows, G, 16]: two e2m1 values per
byte, the low nibble first, 32 values per block) and `<name>_scales` (uint8 [..., rows, G]: one exponent per
block, the block's values times 2^(s - 127)). Other tensors are stored as they are. Dequantizing is what
transformers does when it loads such a folder on a CPU (integrations/mxfp4.py, convert_moe_packed_tensors):
the e2m1 values looked up in bf16, scaled with torch.ldexp in bf16, the rows reshaped to [..., rows, G x 32]
and the last two axes swapped (the layout its model keeps: [experts, in, out]).
"""

import torch

from converter_core.errors import require
from converter_core.formats import hf

CONFIG_KEY = "quantization_config"
METHOD = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"
BLOCK_BYTES = 16  # 32 e2m1 values
# e2m1 codes 0..15: sign bit, two exponent bits, one mantissa bit
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
DTYPE = torch.bfloat16  # what transformers dequantizes to


def is_mxfp4(config):
    """Whether config.json says its weights are MXFP4."""
    settings = config.get(CONFIG_KEY)
    return isinstance(settings, dict) and settings.get("quant_method") == METHOD


def dequantizing(weights, config, where):
    """`weights` (formats.hf.HFWeights) as a loader should see them: an MXFP4 source as a Dequantized view,
    after each `_blocks` and `_scales` pair is checked against the other from the headers (nothing is read
    yet); any other source as it is, after checking that it holds no MXFP4 blocks or scales."""
    names = weights.names()
    packed = {name[:-len(suffix)] for name in names for suffix in (BLOCKS, SCALES) if name.endswith(suffix)
              and weights.stored_dtype(name) == torch.uint8}
    if not is_mxfp4(config):
        example = next(iter(sorted(packed)), None)
        require(example is None, f"{where}: has no {CONFIG_KEY} with quant_method {METHOD}, but the weights hold "
                                 f"MXFP4 tensors such as {example}{BLOCKS} or {example}{SCALES}")
        return weights
    for name in sorted(packed):
        blocks, scales = name + BLOCKS, name + SCALES
        file = weights.file_of.get(blocks) or weights.file_of[scales]
        require(blocks in weights, f"{file}: {scales} without its blocks (there is no {blocks})")
        require(scales in weights, f"{file}: {blocks} without its scales (there is no {scales})")
        require(name not in weights, f"{file}: {name} is stored both as it is and as MXFP4 blocks")
        for part in (blocks, scales):
            require(weights.stored_dtype(part) == torch.uint8, f"{weights.file_of[part]}: {part} is stored as "
                                                               f"{weights.stored_dtype(part)}, not uint8")
        shape, scale_shape = weights.shape(blocks), weights.shape(scales)
        require(len(shape) >= 3 and shape[-1] == BLOCK_BYTES and tuple(shape[:-1]) == tuple(scale_shape),
                f"{weights.file_of[blocks]}: {blocks} {list(shape)} and {scales} {list(scale_shape)} are not MXFP4 "
                f"blocks ([..., rows, groups, {BLOCK_BYTES}]) and their scales ([..., rows, groups])")
    return Dequantized(weights, sorted(packed))


class Dequantized(hf.DecodedWeights):
    """HFWeights of an MXFP4 folder seen as floating-point weights: `<name>` instead of its blocks and
    scales, read as transformers' bf16 dequantization."""
    decoded_dtype = DTYPE

    def __init__(self, weights, packed):
        super().__init__(weights, {name: weights.file_of[name + BLOCKS] for name in packed},
                         {name + suffix for name in packed for suffix in (BLOCKS, SCALES)})

    def decoded_shape(self, name):
        *lead, rows, groups, _ = self.weights.shape(name + BLOCKS)
        shape = [*lead, rows, groups * 2 * BLOCK_BYTES]
        if len(shape) >= 3:
            shape[1], shape[2] = shape[2], shape[1]
        return tuple(shape)

    def decode(self, name):
        return dequantize(self.weights.stored(name + BLOCKS), self.weights.stored(name + SCALES))


def dequantize(blocks, scales):
    """bf16 values of MXFP4 `blocks` [..., rows, G, 16] with exponents `scales` [..., rows, G], as
    transformers computes them, in the layout its model keeps (axes 1 and 2 swapped for 3-D tensors)."""
    *lead, rows, groups, width = blocks.shape
    table = torch.tensor(E2M1, dtype=DTYPE)
    flat = blocks.reshape(-1, width)
    values = torch.empty(flat.shape[0], 2 * width, dtype=DTYPE)
    values[:, 0::2] = table[(flat & 0x0F).long()]
    values[:, 1::2] = table[(flat >> 4).long()]
    torch.ldexp(values, scales.reshape(-1, 1).to(torch.int32) - 127, out=values)
    values = values.reshape(*lead, rows, groups * 2 * width)
    return values.transpose(1, 2).contiguous() if values.dim() >= 3 else values
