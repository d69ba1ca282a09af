"""Multi-token prediction as a family stores it: how many layers config.json says (one key), which
tensors sit around each layer's transformer layer, and the copies of the model's embeddings and output
layer a layer holds. The layers follow the decoder layers under the same prefix: MTP layer i is layer
num_hidden_layers + i, as megatron-core numbers them (message index num_layers + i)."""

import dataclasses

from converter_core import dry_run
from converter_core.errors import require
from converter_core.formats.untrusted import is_count
from converter_core.hf_family.features import Feature
from converter_core.hf_family.table import Tensor
from converter_core.megatron import args as megatron_args

# The names Mtp defaults to (the first Hugging Face release with MTP layers; vLLM reads them so): the norms
# of the next token's embedding and of the hidden state, their projection, and the norm before the shared
# output layer.
MTP_PARTS = (
    Tensor("enorm.weight", "enorm weight"),
    Tensor("hnorm.weight", "hnorm weight"),
    Tensor("eh_proj.weight", "eh proj weight"),
    Tensor("shared_head.norm.weight", "final norm weight"),
)


@dataclasses.dataclass(frozen=True)
class Mtp(Feature):
    """A family's multi-token-prediction layers. `count`: the config.json key of how many there are;
    `layer`: rows of the parts around each layer's transformer layer (names inside the layer, like the
    layer table's); `embedding` / `output`: the names inside the layer of its copies of the model's
    embeddings and output layer, which Megatron shares with the model: the loader checks they are equal
    and drops them, the saver writes them back."""
    count: str = "num_nextn_predict_layers"
    layer: tuple = MTP_PARTS
    embedding: str = "embed_tokens.weight"
    output: str = "shared_head.head.weight"

    def to_args(self, config, where, family):
        value = config.get(self.count)
        require(value in (None, 0) or is_count(value) and value <= megatron_args.LIMITS["mtp_num_layers"],
                f"{where}: {self.count} must be a layer count, got {value!r:.40}")
        return {"mtp_num_layers": value} if value else {}

    def to_config(self, config, args, family):
        layers = megatron_args.mtp_layers(args)
        if layers:  # else absent (none), or a stored count whose layers the source lacked, kept as it was
            config[self.count] = layers

    def copies(self, args, family):
        """{HF name: "embedding" or "output"}: each MTP layer's copies of the shared tables."""
        names = {}
        for depth in range(megatron_args.mtp_layers(args)):
            prefix = family.layer_prefix(args.num_layers + depth)
            names.update({prefix + self.embedding: "embedding", prefix + self.output: "output"})
        return names


def stored_layers(config, family, where):
    """How many multi-token-prediction layers config.json says the family's weights hold (0 without)."""
    if family.mtp is None:
        return 0
    return family.mtp.to_args(config, where, family).get("mtp_num_layers", 0)


def check_copies(weights, args, family, where):
    """Every MTP layer's copy of the embeddings and of the output layer (the embeddings when tied) equals
    the model's, since Megatron keeps one table: refused in one line naming the tensor otherwise."""
    if family.mtp is None:
        return
    output = family.output_layer if megatron_args.untied(args) else family.embedding
    for name, shared in family.mtp.copies(args, family).items():
        model = family.embedding if shared == "embedding" else output
        require(name in weights, f"{where}: the weights lack {name}, the multi-token-prediction layer's copy of {model}")
        require(weights.shape(name) == weights.shape(model) and dry_run.equal(weights.get(name), weights.get(model)),
                f"{weights.file_of[name]}: {name} differs from {model}; Megatron shares one table between the model "
                "and its multi-token-prediction layers, so a different copy cannot be converted")
