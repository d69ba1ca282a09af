"""The Megatron saver: receives the stream, pads the vocabulary, checks the layout the output can hold,
and hands each tensor in the schema's names to the sink of the output format (sinks.py)."""

import argparse

import torch

from converter_core import flags, layout, output, protocol, share as sharing
from converter_core.errors import require
from converter_core.megatron import args as megatron_args, schema as megatron_schema
from converter_core.megatron.schema import final_norm_keys
from converter_core.megatron import sinks
from converter_core.megatron.sinks import SINKS


def add_saver_arguments(parser, title, default_impl="transformer_engine"):
    group = parser.add_argument_group(title=title)
    group.add_argument("--target-tensor-parallel-size", type=flags.positive_int, default=None,
                       help="TP size of the output (default: the source's, else 1)")
    group.add_argument("--target-pipeline-parallel-size", type=flags.positive_int, default=None,
                       help="PP size of the output (default: the source's, else 1)")
    group.add_argument("--target-expert-parallel-size", type=flags.positive_int, default=None,
                       help="EP size of the output: experts split over mp_rank_TT[_PPP]_EEE folders (default: the "
                            "source's, else 1)")
    group.add_argument("--moe-grouped-gemm", action=argparse.BooleanOptionalAction, default=None,
                       help="experts as TEGroupedMLP (TransformerEngine names linear_fc1.weight{E}) or, with --no-, "
                            "SequentialMLP (local_experts.{E}.linear_fc1.weight) (default: as the source says)")
    group.add_argument("--saver-transformer-impl", default=default_impl, choices=["local", "transformer_engine"],
                       help="parameter names to write: TransformerEngine or the local spec")
    group.add_argument("--megatron-path", type=str, default=None, help="accepted and ignored: Megatron is not needed")
    protocol.reads_mtp_layers(parser)  # written to the last stage, or refused by a format without them
    protocol.takes_rows(parser)  # TP shards are split, trimmed and written from their blocks


def output_args(md, args, tp, pp, schema, ckpt_format, ep=1):
    """The Megatron args written into the output: the stream's model args with the new layout."""
    margs = megatron_args.plain_copy(md.checkpoint_args)
    margs.tensor_model_parallel_size, margs.pipeline_model_parallel_size = tp, pp
    margs.expert_model_parallel_size = ep
    if getattr(margs, "num_experts", None) and margs.expert_tensor_parallel_size != 1:
        margs.expert_tensor_parallel_size = tp  # experts split like the dense MLP, unless the args keep them whole
    margs.world_size, margs.data_parallel_size = tp * pp * ep, ep
    margs.virtual_pipeline_model_parallel_size = margs.num_layers_per_virtual_pipeline_stage = None
    for uneven in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
                   "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                   "pipeline_model_parallel_layout"):
        setattr(margs, uneven, None)  # the output splits layers evenly
    margs.transformer_impl, margs.ckpt_format = schema.impl, ckpt_format
    margs.use_dist_ckpt = ckpt_format == "torch_dist"
    margs.use_legacy_models, margs.use_mcore_models = schema.legacy, not schema.legacy
    margs.iteration = md.iteration
    margs.consumed_train_samples = getattr(md, "consumed_train_samples", 0)
    margs.consumed_valid_samples = getattr(md, "consumed_valid_samples", 0)
    megatron_args.set_dtype(margs, md.params_dtype)
    return margs


def save(queue, args, schema, ckpt_format="torch"):
    """Receive the stream and write it in `schema`'s names through the sink of `ckpt_format`."""
    receiver = protocol.Receiver(queue, args.checking, rows=True, stall_timeout=protocol.stall_timeout(args))
    md = receiver.metadata()
    where = f"saver ({args.save_dir})"
    protocol.check_supported(md, where)
    tp = args.target_tensor_parallel_size or md.previous_tensor_parallel_size or 1
    pp = args.target_pipeline_parallel_size or md.previous_pipeline_parallel_size or 1
    require(tp >= 1 and pp >= 1, f"{where}: parallel sizes must be at least 1, got TP {tp}, PP {pp}")
    experts = getattr(md.checkpoint_args, "num_experts", None) or 0
    ep = args.target_expert_parallel_size or (getattr(md.checkpoint_args, "expert_model_parallel_size", 1) or 1
                                              if experts else 1)
    require(ep == 1 or experts, f"{where}: expert parallel size {ep} for a model without experts")
    require(not experts or experts % ep == 0, f"{where}: expert parallel size {ep} does not divide the {experts} experts")
    margs = output_args(md, args, tp, pp, schema, ckpt_format, ep)
    written_format = "legacy" if schema.legacy else ckpt_format
    for setting, why in megatron_schema.FORMAT_LIMITS.get(written_format, {}).items():
        require(not getattr(margs, setting, None), f"{where}: {setting} cannot be written as {written_format}: {why}")
    megatron_args.check_tensor_parallel(margs, tp, where)
    require(pp <= md.num_layers, f"{where}: pipeline size {pp} exceeds the {md.num_layers} layers")
    per_stage = megatron_args.layers_per_stage(md.num_layers, pp, where)
    dtype, last = md.params_dtype, pp - 1
    mtp_layers = megatron_args.mtp_layers(margs)
    if args.moe_grouped_gemm is not None:
        require(not args.moe_grouped_gemm or md.checkpoint_args.num_experts,
                f"{where}: --moe-grouped-gemm for a model without experts")
        margs.moe_grouped_gemm = args.moe_grouped_gemm
    naming = margs  # whose moe_grouped_gemm picks the expert names: torch_dist has one layout for both
    if ckpt_format == "torch" and not schema.legacy:
        schema.grouped(margs)  # refuses GroupedMLP (local names) before anything is written
    else:
        naming = megatron_args.plain_copy(margs)
        naming.moe_grouped_gemm = False

    sink = SINKS[ckpt_format](args.save_dir, md.iteration, tp, pp, schema, margs, ep, getattr(args, "workers", 1),
                              sharing.of(args), output.commit_gate(args))
    layers = [(protocol.layer_name(index), index, index // per_stage) for index in range(md.num_layers)]
    layers += [(protocol.mtp_layer_name(depth), md.num_layers + depth, last) for depth in range(mtp_layers)]
    sharing.announce_skipped(args, [name for name, index, stage in layers if not sink.needs_layer(index, stage)])
    try:
        message = receiver.get(protocol.EMBEDDINGS, {"word embeddings": (None, margs.hidden_size)})
        table = message.pop("word embeddings")
        receiver.check_consumed(message)
        rows = table.shape[0]
        if md.true_vocab_size:
            divisible = md.make_vocab_size_divisible_by or margs.make_vocab_size_divisible_by or 128
            rows = layout.padded_vocab_size(md.true_vocab_size, divisible, tp)
            margs.vocab_size = md.true_vocab_size
        else:
            protocol.report("note", message="Original vocab size not specified, leaving embedding table as-is.")
            require(rows % tp == 0, f"{where}: {rows} vocabulary rows do not split over TP {tp}; give --true-vocab-size")
        margs.padded_vocab_size = rows
        table = table.to(dtype)
        sink.put_vocab(0, schema.word_embeddings, table, rows)
        if not md.output_layer and pp > 1 and sink.per_rank:
            sink.put_vocab(last, schema.tied_output_layer, table, rows)
        if mtp_layers and pp > 1 and sink.per_rank:  # megatron-core's last stage keeps its own copy for MTP
            sink.put_vocab(last, schema.word_embeddings, table, rows)

        def put_layer(name, index, stage, local):
            """Receive message `name`, layer `index` of the model (local index `local` on pipeline `stage`)."""
            message = receiver.get(name, protocol.layer_message_shapes(margs, index))
            needed = sink.needs_layer(index, stage)  # else only its shapes and dtypes reach the sink
            sharing.check_not_skipped(message, needed, where)
            for entry in schema.entries(naming, index):
                tensors = [_stored(message.pop(key), protocol.stored_dtype(key, dtype), needed) for key in entry.keys]
                value = tuple(tensors) if entry.kind == layout.SWIGLU else tensors[0]
                sink.put_layer(index, stage, local, entry.name, value, entry.kind, entry.experts)
            for key, value in schema.layer_values(naming, index, experts // ep if sink.per_rank else experts).items():
                sink.put_layer_value(index, stage, local, key, value)
            receiver.check_consumed(message)

        for index in range(md.num_layers):
            put_layer(protocol.layer_name(index), index, *divmod(index, per_stage))

        message = receiver.get(protocol.FINAL_NORM, {key: (margs.hidden_size,) for key in final_norm_keys(margs)})
        for key in final_norm_keys(margs):
            sink.put(last, schema.final_norm(key), message.pop(key).to(dtype), layout.REPLICATED)
        receiver.check_consumed(message)
        if md.output_layer:
            message = receiver.get(protocol.OUTPUT_LAYER, {"weight": (None, margs.hidden_size)})
            weight = message.pop("weight")
            receiver.check_consumed(message)
            require(md.true_vocab_size or weight.shape[0] == margs.padded_vocab_size,
                    f"{where}: output layer has {weight.shape[0]} rows, embeddings {margs.padded_vocab_size}")
            sink.put_vocab(last, schema.output_layer, weight.to(dtype), margs.padded_vocab_size)
        for path, value in schema.last_stage_values().items():
            sink.put_value(last, path, value)
        for depth in range(mtp_layers):
            put_layer(protocol.mtp_layer_name(depth), md.num_layers + depth, last, None)
        receiver.done()
        sink.finish(margs)
    except BaseException:
        sink.abandon()
        raise
    protocol.report("saved", message=f"{'wrote its files of' if sharing.of(args) else 'saved'} TP {tp} x PP {pp}"
                                     f"{f' x EP {ep}' if ep > 1 else ''} checkpoint to {args.save_dir}")


def _stored(tensor, dtype, needed):
    """`tensor` in `dtype`; for a layer in no file of this rank's, a tensor with its shape and no data (nothing
    is read or converted)."""
    return tensor.to(dtype) if needed else torch.empty(tensor.shape, dtype=dtype, device="meta")


def finish_share(args, pieces):
    """Finish a job whose ranks each wrote their files (converter_core.share): on rank 0, after all succeeded."""
    staged = sinks.staged_iteration(args.save_dir, pieces[0]["iteration"], args.share, output.commit_gate(args))
    sinks.finish_output(args.save_dir, staged, pieces)
