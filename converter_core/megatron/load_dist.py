"""The Megatron loader of torch_dist checkpoints (load.load hands such a folder here)."""

import torch

from converter_core import layout, protocol, share as sharing
from converter_core.errors import ConversionError, require
from converter_core.formats import torch_dist
from converter_core.megatron import args as megatron_args, schema as megatron_schema
from converter_core.megatron.load_flags import source_metadata
from converter_core.megatron.schema import final_norm_keys


def load_dist(queue, args, iteration, folder):
    """Stream a torch_dist checkpoint: args from common.pt, then each layer sliced out of the stacked
    `decoder.layers.*` tensors (or per-layer keys), memory-mapped; optimizer and extra states skipped."""
    margs = megatron_args.complete(torch_dist.read_common(folder)["args"], str(folder / torch_dist.COMMON))
    reader = torch_dist.DistReader(folder)
    where = folder / torch_dist.DCP_METADATA
    protocol.check_supported(protocol.make_metadata(margs, true_vocab_size=None), str(folder / torch_dist.COMMON))
    layers, hidden = margs.num_layers, margs.hidden_size
    try:  # the layers its args describe are ones this converter knows (named after the file if not)
        for index in range(layers + megatron_args.mtp_layers(margs)):
            megatron_schema.layer_entries(margs, index)
    except ConversionError as error:
        raise ConversionError(f"{folder / torch_dist.COMMON}: {error}") from None

    def expected(entry, shapes):
        """The shape of `entry`'s tensor, from its layer's message shapes {key: shape}."""
        shape = shapes[entry.keys[0]]
        axis = 1 if entry.experts else 0  # SwiGLU's [W; V] rows, after the expert axis
        rows = sum(shapes[key][axis] for key in entry.keys)
        return (*shape[:axis], rows, *shape[axis + 1:]) if entry.kind == layout.SWIGLU else shape

    def source_of(candidates, index):
        """(key, index along the stacked axis or None) holding an entry of layer `index`: under the
        stacked key or a per-layer one, as TransformerEngine's or the local spec names it (an MTP layer:
        its own keys)."""
        if index >= layers:
            return next((key for key in candidates if key in reader), candidates[0]), None
        for stacked in candidates:
            per_layer = stacked.replace("decoder.layers.", f"decoder.layers.{index}.", 1)
            if stacked in reader or per_layer in reader:
                return (stacked, index) if stacked in reader else (per_layer, None)
        return candidates[0], index

    mtp_layers = megatron_args.mtp_layers(margs)
    for index in range(layers + mtp_layers):
        shapes = protocol.layer_message_shapes(margs, index)
        for entry, candidates in megatron_schema.dist_layer_candidates(margs, index):
            key, position = source_of(candidates, index)
            require(key in reader, f"{where}: layer {index}: no tensor {' or '.join(candidates)}, stacked or per "
                                   f"layer (the args describe {layers} layers of this model)")
            want = ((layers,) if position is not None else ()) + expected(entry, shapes)
            require(reader.shape(key) == want,
                    f"{where}: {key} has shape {list(reader.shape(key))}, the args in {torch_dist.COMMON} imply {list(want)}")
    table_key, norm_key = "embedding.word_embeddings.weight", "decoder.final_layernorm"
    require(table_key in reader and reader.shape(table_key)[1:] == (hidden,),
            f"{where}: {table_key} missing or not [vocab, {hidden}]")
    for key in final_norm_keys(margs):
        require(f"{norm_key}.{key}" in reader and reader.shape(f"{norm_key}.{key}") == (hidden,),
                f"{where}: {norm_key}.{key} missing or not [{hidden}]")
    untied = megatron_args.untied(margs)
    if untied:
        require(reader.shape("output_layer.weight") == reader.shape(table_key) if "output_layer.weight" in reader else False,
                f"{where}: output_layer.weight missing or not shaped like the embeddings")
    md = source_metadata(margs, args, iteration, margs.tensor_model_parallel_size, margs.pipeline_model_parallel_size)
    protocol.check_mtp_reader(args, md, str(folder / torch_dist.COMMON))

    def layer_message(index):
        name = protocol.layer_name(index) if index < layers else protocol.mtp_layer_name(index - layers)
        if sharing.skipped(args, name):  # no file of this rank's saver holds it: nothing read
            return protocol.placeholder(margs, index, md.params_dtype)
        message, shapes = {}, protocol.layer_message_shapes(margs, index)
        for entry, candidates in megatron_schema.dist_layer_candidates(margs, index):
            tensor = reader.read(*source_of(candidates, index))
            parts = torch.split(tensor, [shapes[key][int(entry.experts)] for key in entry.keys], dim=int(entry.experts))
            message.update(zip(entry.keys, parts))
        return message

    def messages():
        yield protocol.EMBEDDINGS, {"word embeddings": reader.read(table_key)}
        for index in range(layers):
            yield protocol.layer_name(index), layer_message(index)
        yield protocol.FINAL_NORM, {key: reader.read(f"{norm_key}.{key}") for key in final_norm_keys(margs)}
        if untied:
            yield protocol.OUTPUT_LAYER, {"weight": reader.read("output_layer.weight")}
        for depth in range(mtp_layers):
            yield protocol.mtp_layer_name(depth), layer_message(layers + depth)

    protocol.send_model(queue, md, messages(), protocol.stall_timeout(args), protocol.saver_takes_rows(args))
