"""Hugging Face folder <-> message stream, for any family described as data (the plugins pass theirs)."""

import json
import os
import shutil
from pathlib import Path

import torch

from converter_core import dry_run, flags, hf_family, layout, output, protocol, share as sharing, vocab, workers
from converter_core.errors import ConversionError, require, require_folder
from converter_core.formats import fp8, hf, mxfp4
from converter_core.megatron import args as megatron_args

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


def add_loader_arguments(parser, title, model_sizes=None):
    """`model_sizes`: the --model-size choices of the convert.py plugin this one replaces (any value if None)."""
    group = parser.add_argument_group(title=title)
    group.add_argument("--checkpoint-type", choices=["hf", "meta"], default="hf",
                       help="only 'hf' is supported; kept for convert.py command lines")
    group.add_argument("--model-size", type=str, default=None, choices=model_sizes,
                       help="accepted for convert.py command lines; the shape comes from config.json")
    group.add_argument("--bf16", action="store_true", help="convert the weights to bfloat16")
    group.add_argument("--fp16", action="store_true", help="convert the weights to float16")
    group.add_argument("--true-vocab-size", type=flags.positive_int, default=None,
                       help="vocabulary rows the Megatron checkpoint is padded from (default: the tokenizer's "
                            "size when --tokenizer-model is given, else config.json vocab_size)")
    group.add_argument("--vocab-file", type=str, default=None, help="accepted and unused, as convert.py")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="tokenizer folder or file recorded in the Megatron args")
    group.add_argument("--make-vocab-size-divisible-by", type=flags.positive_int, default=None,
                       help="Megatron vocabulary padding multiple (default 128)")
    group.add_argument("--megatron-path", type=str, default=None, help="accepted and ignored: Megatron is not needed")
    group.add_argument("--loader-transformer-impl", default="local", choices=["local", "transformer_engine"],
                       help="accepted and ignored by HF loaders")


def add_saver_arguments(parser, title):
    group = parser.add_argument_group(title=title)
    group.add_argument("--hf-reference-dir", type=str, default=None,
                       help="HF folder whose config.json is the starting point and whose non-weight files are "
                            "copied (remote-code .py files come from here, else from the HF folder the checkpoint "
                            "was made from)")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="tokenizer folder or tokenizer.model to copy into the output")
    group.add_argument("--true-vocab-size", type=flags.positive_int, default=None, help="vocabulary rows to keep")
    group.add_argument("--hf-model-type", default=None, metavar="MODEL_TYPE",
                       help="family to write (its config.json model_type), instead of the stream's own or the one "
                            "its Megatron args describe")
    group.add_argument("--max-shard-size", type=flags.byte_size, default="50GB",
                       help="largest safetensors shard before splitting with an index (default 50GB, as transformers 5)")
    group.add_argument("--megatron-path", type=str, default=None, help="accepted and ignored: Megatron is not needed")
    protocol.reads_mtp_layers(parser)  # written by a family with Mtp, refused by the others
    protocol.takes_rows(parser)  # a Megatron source's TP shards are written from their blocks


def read_config(folder):
    """(config.json of an HF folder as a dict, its path): what detect and the loader read alike."""
    path = Path(folder) / hf.CONFIG
    config = hf.read_json(path)
    require(isinstance(config, dict), f"{path}: expected a JSON object", path=path)
    return config, path


def config_args(config, config_path, dtype, untied, family, **fields):
    """hf_family.args_from_config, with a missing or unusable field as one line naming config.json."""
    try:
        return hf_family.args_from_config(config, str(config_path), dtype, untied, family, **fields)
    except KeyError as missing:
        raise ConversionError(f"{config_path}: missing field {missing}", path=config_path) from None
    except (TypeError, ValueError, AttributeError) as error:  # a field of the wrong kind
        raise ConversionError(f"{config_path}: unusable field ({type(error).__name__}: {error})",
                              path=config_path) from None


def load(queue, args, families):
    """Stream an HF folder of one of `families` ({model_type: Family}): metadata, then one layer at a
    time (never the whole state dict)."""
    folder = Path(args.load_dir)
    require_folder(folder)
    require(args.checkpoint_type == "hf", f"{folder}: --checkpoint-type meta is not supported; convert to HF first")
    config, config_path = read_config(folder)
    weights = mxfp4.dequantizing(hf.HFWeights(folder), config, str(config_path))  # MXFP4 and FP8 sources
    if not mxfp4.is_mxfp4(config):                                                  # are read as floats
        weights = fp8.dequantizing(weights, config, str(config_path))
    family = hf_family.family_of(config, str(config_path), families)
    decoder = family.decoder_config(config, str(config_path))  # the decoder's fields (config.json or inside it)
    require(family.embedding in weights, f"{folder}: the weights hold no {family.embedding}")
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else weights.dtype(family.embedding)
    untied = not decoder.get("tie_word_embeddings", family.tied_by_default)
    if untied:
        require(family.output_layer in weights,
                f"{folder}: config.json says untied embeddings but there is no {family.output_layer}")
    hf_family.check_counts(decoder, str(config_path))
    mtp = check_layers(weights, decoder["num_hidden_layers"], config_path, family,  # before anything is sized by it
                       hf_family.stored_mtp_layers(decoder, family, str(config_path)))
    fields = dict(make_vocab_size_divisible_by=args.make_vocab_size_divisible_by or 128,
                  tokenizer_type="HuggingFaceTokenizer",
                  tokenizer_model=os.path.abspath(args.tokenizer_model or folder),  # read from anywhere
                  hf_source_dir=str(folder.resolve()))
    margs = config_args(config, config_path, dtype, untied, family, **fields)
    if not mtp:
        margs.mtp_num_layers = None  # the weights lack the layers config.json counts (check_layers said so)
    hf_family.check_table(family, margs, str(config_path))
    shapes = hf_family.expected_shapes(margs, decoder["vocab_size"], family)
    unknown = [n for n in weights.names() if n not in shapes and n != family.output_layer and not family.ignores(n)]
    if unknown:
        raise ConversionError(f"{folder}: the weights hold tensors that config.json and the {family.model_type} "
                              f"family's table do not describe, e.g. {unknown[0]}")
    for name, shape in shapes.items():  # headers only: every tensor is there, a float, and shaped as config.json says
        weights.dtype(name)
        require(weights.shape(name) == shape,
                f"{weights.file_of[name]}: {name} has shape {list(weights.shape(name))}, config.json implies {list(shape)}")
    if not untied and family.output_layer in weights:  # transformers keeps a stored one apart: never drop it
        require(weights.shape(family.output_layer) == weights.shape(family.embedding)
                and dry_run.equal(weights.get(family.output_layer), weights.get(family.embedding)),
                f"{weights.file_of[family.output_layer]}: {family.output_layer} differs from {family.embedding}, but "
                f"{config_path} says tie_word_embeddings; set it to false there to keep both")
    hf_family.check_mtp_copies(weights, margs, family, str(folder))
    copies = family.mtp.copies(margs, family) if family.mtp else {}  # equal to the shared tables: not sent

    float32 = hf_family.float32_names(margs, family)

    def read(name):
        return weights.get(name).to(torch.float32 if name in float32 else dtype)

    def layer(name, index):
        if sharing.skipped(args, name):  # no file of this rank's saver holds it: nothing read or computed
            return protocol.placeholder(margs, index, dtype)
        tensors = {name: read(name) for name in shapes if family.layer_index(name) == index and name not in copies}
        return hf_family.layer_to_message(tensors, index, margs, family)

    def messages():
        yield protocol.EMBEDDINGS, {"word embeddings": read(family.embedding)}
        for index in range(margs.num_layers):
            yield protocol.layer_name(index), layer(protocol.layer_name(index), index)
        yield protocol.FINAL_NORM, {key: read(name) for key, name in family.final_norm_names().items()}
        if untied:
            yield protocol.OUTPUT_LAYER, {"weight": read(family.output_layer)}
        for depth in range(mtp):
            yield protocol.mtp_layer_name(depth), layer(protocol.mtp_layer_name(depth), margs.num_layers + depth)

    md = protocol.make_metadata(margs, true_vocab_size=loader_vocab_size(args, decoder, folder))
    protocol.check_mtp_reader(args, md, str(config_path))
    protocol.send_model(queue, md, messages(), protocol.stall_timeout(args), protocol.saver_takes_rows(args))


def check_layers(weights, count, config_path, family, mtp=0):
    """num_hidden_layers, and the `mtp` multi-token-prediction layers config.json adds, name exactly the
    layers the weights hold (before anything is sized from them). Returns the MTP layers held: `mtp`, or 0
    when the weights hold the decoder layers alone (releases that drop the MTP layer keep its count)."""
    present = {index for index in map(family.layer_index, weights.names()) if index is not None}
    if mtp and present == set(range(count)):
        protocol.report("note", message=f"note: {config_path} counts {mtp} multi-token-prediction layer(s), the "
                                        "weights hold none; converted without them")
        return 0
    held = f"layers {min(present)}..{max(present)} ({len(present)} of them)" if present else "no layers"
    if not mtp and len(present) > count and present >= set(range(count)):  # the decoder and more layers
        held += "; multi-token-prediction layers past num_hidden_layers convert only where the family declares them"
    extra = f" plus {mtp} multi-token-prediction layer(s)" if mtp else ""
    require(len(present) == count + mtp and present == set(range(count + mtp)),
            f"{config_path}: num_hidden_layers is {count}{extra}, but the weights hold {held}")
    return mtp


def loader_vocab_size(args, config, folder):
    """convert.py's order: --true-vocab-size, else the tokenizer given, else config.json's vocab_size."""
    if args.true_vocab_size:
        return args.true_vocab_size
    if args.tokenizer_model:
        size = vocab.tokenizer_size(args.tokenizer_model)
        if size != config["vocab_size"]:
            protocol.report("note", message=f"note: the tokenizer has {size} tokens and {folder}/config.json "
                                            f"{config['vocab_size']} rows; the Megatron checkpoint is padded from {size}")
        return size
    return config["vocab_size"]


def save(queue, args, families, folds=()):
    """Write the stream as an HF folder of one of `families` (hf_family.family_for_stream chooses). A
    stream carrying a feature the written family lacks (muP scalars, say) is folded by that feature:
    one of `folds`, or of the features of `families`."""
    receiver = protocol.Receiver(queue, args.checking, rows=True, stall_timeout=protocol.stall_timeout(args))
    md = receiver.metadata()
    where = f"saver ({args.save_dir})"
    protocol.check_supported(md, where, to_hf=True)
    margs = megatron_args.plain_copy(md.checkpoint_args)
    if args.hf_reference_dir:
        require(Path(args.hf_reference_dir).is_dir(), f"{args.hf_reference_dir}: no such reference folder")
        margs.hf_config_json = json.dumps(hf.read_json(Path(args.hf_reference_dir) / hf.CONFIG))
    if args.hf_model_type:
        require(args.hf_model_type in families,
                f"--hf-model-type {args.hf_model_type}: this saver writes {', '.join(families)}")
        family = families[args.hf_model_type]
    else:
        family = hf_family.family_for_stream(margs, families, where)
    fold = folding(margs, family, families, folds, where)
    if fold:
        margs, family = fold.args, fold.family
    hf_family.check_table(family, margs, where)
    rows = vocab.true_vocab_size(args, md, margs)
    dtype = md.params_dtype
    config = hf_family.config_from_args(margs, rows, family)
    config.pop(fp8.CONFIG_KEY, None)  # an FP8 source's (or reference's): the weights written are not quantized
    shapes = hf_family.expected_shapes(margs, rows, family)
    float32 = hf_family.float32_names(margs, family)
    hidden = margs.hidden_size
    final_norm = family.final_norm_names()
    code_folder, code_files = remote_code_source(args, margs, config, where)
    share = sharing.of(args)
    staged = output.StagedFolder(args.save_dir, job=share and share.job, gate=output.commit_gate(args))
    pool = workers.Workers(getattr(args, "workers", 1))
    try:
        def stored(name):
            return torch.float32 if name in float32 else dtype

        writer = hf.PlannedSafetensors(staged.path, [(n, stored(n), s) for n, s in shapes.items()],
                                       args.max_shard_size, share=share)

        def write(name, tensor, factor=1):
            """`tensor` may be a tuple of row blocks, or Columns: written as they are unless scaled or converted
            (only for a shard this rank writes)."""
            scaled = fold and factor != 1 and writer.owns(name)
            if scaled or writer.owns(name) and (tensor[0] if isinstance(tensor, tuple) else tensor).dtype != stored(name):
                whole = layout.assemble(tensor) if isinstance(tensor, tuple) else layout.tensor_of(tensor)
                tensor = (whole.float() * factor if scaled else whole).to(stored(name))
            writer.write(name, tensor, pool.submit)

        copies = family.mtp.copies(margs, family) if family.mtp else {}
        layers = {protocol.layer_name(index): index for index in range(md.num_layers)}
        layers.update((protocol.mtp_layer_name(depth), md.num_layers + depth)
                      for depth in range(megatron_args.mtp_layers(margs)))

        def needs(index):
            """Whether a shard this rank writes holds a tensor of layer `index`."""
            prefix = family.layer_prefix(index)
            return any(writer.owns(name) for name in shapes if name.startswith(prefix))

        sharing.announce_skipped(args, [name for name, index in layers.items() if not needs(index)])

        def write_shared(table, tensor, factor):
            """The model's embeddings or output layer (`table`), then the MTP layers' copies of it."""
            write(family.embedding if table == "embedding" else family.output_layer, tensor, factor)
            for name in (name for name, shared in copies.items() if shared == table):
                write(name, tensor, factor)

        message = receiver.get(protocol.EMBEDDINGS, {"word embeddings": (None, hidden)})
        embeddings = vocab.trim(message.pop("word embeddings"), rows, "word embeddings")
        write_shared("embedding", embeddings, fold.embeddings if fold else 1)
        if fold and not md.output_layer:
            write(family.output_layer, embeddings, fold.output)
        if not md.output_layer:  # tied: the MTP layers' heads are the embeddings
            for name in (name for name, shared in copies.items() if shared == "output"):
                write(name, embeddings, fold.output if fold else 1)
        receiver.check_consumed(message)

        def put_layer(name, index):
            message = receiver.get(name, protocol.layer_message_shapes(margs, index))
            needed = needs(index)
            sharing.check_not_skipped(message, needed, where)
            if not needed:  # in another rank's shards: checked there, neither mapped nor scaled here
                for key in [key for key in message if key != "name"]:
                    del message[key]
            for key, factor in (fold.layer.items() if fold and needed else ()):
                message[key] = layout.tensor_of(message[key]).float() * factor
            for hf_name, tensor in hf_family.message_to_layer(message, index, margs, family).items() if needed else ():
                write(hf_name, tensor)
            receiver.check_consumed(message)

        for index in range(md.num_layers):
            put_layer(protocol.layer_name(index), index)
        message = receiver.get(protocol.FINAL_NORM, {key: (hidden,) for key in final_norm})
        for key, name in final_norm.items():
            write(name, message.pop(key))
        receiver.check_consumed(message)
        if md.output_layer:
            message = receiver.get(protocol.OUTPUT_LAYER, {"weight": (None, hidden)})
            write_shared("output", vocab.trim(message.pop("weight"), rows, "output layer"), fold.output if fold else 1)
            receiver.check_consumed(message)
        for depth in range(megatron_args.mtp_layers(margs)):
            put_layer(protocol.mtp_layer_name(depth), md.num_layers + depth)
        receiver.done()
        pool.finish()
        pieces = dict(writer.finish(), config=config, generation=generation_config(family.decoder_config(config)),
                      code=[str(code_folder), code_files] if code_files else None)
        if share is None:
            finish_output(args, staged, [pieces])
        else:
            sharing.write_pieces(share, pieces)
    except BaseException:
        try:
            pool.abandon()
        finally:
            staged.abandon()
        raise
    if fold:
        protocol.report("note", message=fold.note)
    files = f"{len(writer.own_files)} of {len(writer.files)}" if share else len(writer.files)
    protocol.report("saved", message=f"{'wrote' if share else 'saved'} {files} safetensors file(s) to {args.save_dir}")


def finish_output(args, staged, pieces):
    """What is left once every rank's shards are written (`pieces`: each rank's, from PlannedSafetensors.finish
    and save above): the index (written by PlannedSafetensors in a run of one process), the reference's and tokenizer's
    files, remote code, config.json and generation_config.json; then the folder is committed."""
    if sharing.of(args):
        hf.write_index(staged.path, pieces)
    first = pieces[0]
    copy_side_files(args, staged.path)
    code_folder, code_files = first["code"] or (None, [])
    for name in code_files:
        (staged.path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(code_folder) / name, staged.path / name)
    write_json(staged.path / hf.CONFIG, first["config"])
    if first["generation"] and not (staged.path / "generation_config.json").exists():
        write_json(staged.path / "generation_config.json", first["generation"])
    staged.commit()


def finish_share(args, pieces):
    """Finish a job whose ranks each wrote their shards (converter_core.share): on rank 0, after all succeeded."""
    finish_output(args, output.StagedFolder(args.save_dir, job=args.share.job, gate=output.commit_gate(args)), pieces)


def folding(args, family, families, folds, where):
    """The Fold for writing the stream as `family`, if it carries a feature `family` lacks; else None."""
    candidates = list(folds) + [part for member in families.values() for part in member.features]
    for feature in dict.fromkeys(candidates):
        if feature.carried_by(args) and feature not in family.features:
            fold = feature.fold(args, family, where)
            require(fold is not None, f"{where}: {family.model_type} cannot hold the stream's "
                                      f"{type(feature).__name__} settings, and they cannot be folded into its weights")
            return fold
    return None


def remote_code_files(config):
    """The .py files that config.json's auto_map has transformers import from the model folder."""
    files = set()
    for value in (config.get("auto_map") or {}).values():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(reference, str) and "--" not in reference:  # "repo--module.Class" lives elsewhere
                files.add(reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return sorted(files)


def remote_code_source(args, margs, config, where):
    """(folder, files): where the output's remote-code files come from, checked before anything is
    written: --hf-reference-dir, else the HF folder the stream started from, if it still holds them."""
    files = remote_code_files(config)
    if not files:
        return None, []
    for folder in (args.hf_reference_dir, getattr(margs, "hf_source_dir", None)):
        if folder and all((Path(folder) / name).is_file() for name in files):
            return Path(folder), files
    raise ConversionError(f"{where}: config.json's auto_map needs {', '.join(files)}, and the source HF folder "
                          "recorded in the checkpoint does not hold them; give --hf-reference-dir with a folder that does "
                          "(e.g. the original model)")


def write_json(path, value):
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.write("\n")


def generation_config(config):
    known = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return dict(known, _from_model_config=True) if known else None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def copy_side_files(args, destination):
    """Non-weight files of --hf-reference-dir, then the tokenizer of --tokenizer-model, byte for byte."""
    if args.hf_reference_dir:
        reference = Path(args.hf_reference_dir)
        require(reference.is_dir(), f"{reference}: no such reference folder")
        for path in sorted(reference.iterdir()):
            if path.is_file() and path.name != hf.CONFIG and not path.name.endswith(WEIGHT_SUFFIXES) \
                    and not path.name.endswith(".index.json"):
                shutil.copyfile(path, destination / path.name)
    if args.tokenizer_model:
        source = Path(args.tokenizer_model)
        require(source.exists(), f"{source}: no such tokenizer folder or file")
        if source.is_dir():
            files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
            require(files, f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
            for path in files:
                shutil.copyfile(path, destination / path.name)
        else:
            shutil.copyfile(source, destination / ("tokenizer.model" if source.suffix == ".model" else source.name))
