"""converter_core as a library: convert() runs one conversion (loader and saver still in child
processes), detect() says what a folder is, supported() what the installed plugins convert."""

import dataclasses
import math
import os
import re
import time
from pathlib import Path

from converter_core import distributed, dry_run as planning, events, hf_family, hf_stream, hub
from converter_core import options as option_parsing, plugins, protocol
from converter_core.errors import ConversionError, require, require_folder
from converter_core.formats import hf, rank_files, torch_dist, torch_file
from converter_core.megatron import args as megatron_args, schema as megatron_schema


@dataclasses.dataclass
class Result:
    """What one conversion wrote."""
    save_dir: Path       # the output folder
    files: list          # every file of the output, relative to save_dir
    bytes: int           # their total size
    seconds: float       # the run's wall time
    warnings: list       # the warnings the loader and saver reported, as text
    plan: planning.Plan = None  # dry_run=True: what a real run would write (files and bytes above: none)


def convert(loader, saver, load_dir, save_dir, *, model_type="GPT",
            target_tensor_parallel_size: int = None, target_pipeline_parallel_size: int = None,
            target_expert_parallel_size: int = None, ckpt_format: str = None, dtype: str = None,
            saver_transformer_impl: str = None, true_vocab_size: int = None, tokenizer_model: str = None,
            hf_reference_dir: str = None, hf_model_type: str = None, max_shard_size: str = None,
            workers: int = None, max_queue_size: int = None, stall_timeout: float = None, checking: bool = None,
            processes: int = None, plugin_options: dict = None, progress=None, cancel=None, handle_signals=False,
            dry_run: bool = False,
            **options):
    """Convert `load_dir` with the `loader` plugin into `save_dir` with the `saver` plugin.

    `load_dir` may be a Hugging Face Hub id, `org/name` or `org/name@revision` (hub.resolve).
    The named options (None: the plugins' default, often the source's own value) and, for the rest,
    `plugin_options` or plain keywords are the command line's flags under their Python names
    (options(loader, saver) lists those of a pair), validated exactly as the command line validates them:
      target_tensor_parallel_size, target_pipeline_parallel_size, target_expert_parallel_size: the
        Megatron output's TP, PP and EP (Megatron savers)
      ckpt_format: "torch" (per-rank files) or "torch_dist" (the mcore saver)
      dtype: "bf16" or "fp16" converts the weights (HF loaders; default: the source's dtype)
      saver_transformer_impl: "transformer_engine" or "local" parameter names (Megatron savers)
      true_vocab_size: vocabulary rows without padding; tokenizer_model: a tokenizer folder or file
      hf_reference_dir: a folder whose config and tokenizer files an HF saver starts from
      hf_model_type: the HF family an HF saver writes; max_shard_size: e.g. "5GB", an HF saver's shards
      workers: writer threads per saver; max_queue_size: messages in flight; stall_timeout: seconds
        a side may wait on the other (0: forever); checking=False skips the message checks
      processes: ranks the conversion is split over on this machine (default 1), the same engine as
        torchrun's (docs/scale-out.md): the calling process is rank 0, so progress, cancel and
        handle_signals work as with one; the output is the same whatever the number. (convert() never
        joins a torchrun world: a script torchrun started may call it on one rank.)
    `progress(event)` receives each event in the caller's process, in order (converter_core.events): a dict
    that is also a typed object, e.g. StartEvent (messages, layers), SentEvent and WrittenEvent (name, bytes,
    count, total, and the job's fraction, bytes_done, seconds, eta_seconds), NoteEvent, WarningEvent,
    SavedEvent (message), then FinishEvent (save_dir, files, bytes, and the job's fields; fraction 1.0).
    `cancel` (a threading.Event) stops the run within a second, removes the staged output and raises.
    `handle_signals=True` (main thread only) lets SIGTERM, SIGINT and SIGHUP stop the run the same way.
    `dry_run=True` reads headers and metadata only, makes every check a real run makes (and that the output
    fits on its disk), writes nothing, and returns Result.plan (dry_run.Plan: files with their sizes,
    bytes_read, bytes_written, estimated_seconds at the last measured rate).
    Never prints and never exits; raises ConversionError with `.role` ("loader", "saver", "arguments"),
    `.kind` ("input", "internal", "interrupted"), `.path` (the file or folder at fault, or None) and the
    one-line message, which names this function's keywords (save_dir) where the command line's names its flags."""
    if dtype not in (None, "bf16", "fp16"):
        raise option_parsing.UsageError(f"dtype must be 'bf16' or 'fp16', got {dtype!r}", "")
    if dtype and dtype not in {option.name for option in option_parsing.option_list(loader, saver)}:
        raise option_parsing.UsageError(f"dtype: the {loader} loader keeps the source's dtype", "")
    named = dict(target_tensor_parallel_size=target_tensor_parallel_size,
                 target_pipeline_parallel_size=target_pipeline_parallel_size,
                 target_expert_parallel_size=target_expert_parallel_size, ckpt_format=ckpt_format,
                 saver_transformer_impl=saver_transformer_impl, true_vocab_size=true_vocab_size,
                 tokenizer_model=tokenizer_model, hf_reference_dir=hf_reference_dir, hf_model_type=hf_model_type,
                 max_shard_size=max_shard_size, workers=workers, max_queue_size=max_queue_size,
                 stall_timeout=stall_timeout, checking=checking, processes=processes)
    given = {name: value for name, value in named.items() if value is not None}
    if dtype:
        given[dtype] = True  # the loader's --bf16 or --fp16
    for more in (plugin_options or {}), options:
        for name in set(more) & set(given):
            raise option_parsing.UsageError(f"option {name!r} is given twice", "")
        given.update(more)
    argv = ["--model-type", model_type, "--loader", loader, "--saver", saver, "--load-dir", os.fspath(load_dir),
            "--save-dir", os.fspath(save_dir)] + ["--dry-run"] * bool(dry_run)
    try:
        return convert_argv(argv, given, progress=progress, cancel=cancel, handle_signals=handle_signals)
    except ConversionError as error:
        error.args = (_keywords_for_flags(str(error), loader, saver, dtype),)
        raise


def _keywords_for_flags(message, loader, saver, dtype):
    """`message` with each of the pair's flags named as the keyword that stands for it."""
    try:
        keywords = option_parsing.keywords(loader, saver)
    except ConversionError:  # a plugin that does not load: no flag of its to name
        keywords = option_parsing.keywords("megatron", "megatron")
    if dtype:
        keywords["--" + dtype] = f"dtype={dtype!r}"
    return re.sub(r"--[a-z][a-z0-9-]*", lambda flag: keywords.get(flag[0], flag[0]), message)


def options(loader, saver):
    """Every option convert() takes for this `loader` and `saver` pair, as options.Option (name: the
    keyword, flag, type, default, help, plugin and role that declare it, choices), core options first."""
    return option_parsing.option_list(loader, saver)


def convert_argv(argv, options=None, *, progress=None, cancel=None, handle_signals=False, torchrun=False):
    """convert() for a convert.py command line (`argv`, plus keyword `options`); what the CLI runs. With
    `torchrun` (the command line) a process torchrun started is one rank of its world; only rank 0
    returns the Result (the others None)."""
    try:
        args, loader_module, saver_module = option_parsing.parse(argv, options)
        args.load_dir = _source(args.load_dir)
        _side_folders(args)
        option_parsing.check_folders(args.load_dir, args.save_dir)
        world = distributed.world_size(args, torchrun)
        require(not (args.dry_run and world > 1), "--dry-run plans the conversion in one process; run it without "
                                                  "--processes or torchrun (the files and sizes are the same)")
    except ConversionError as error:
        raise distributed.early_failure(error, torchrun) from None
    if args.dry_run:
        return _dry_run(args, loader_module, saver_module, progress, cancel, handle_signals)
    warnings, tracker, said = [], events.Tracker(world), set()

    def on_event(raw):  # called from one relay thread at a time, in order
        event = tracker(raw)
        if world > 1 and event["event"] in ("note", "warning", "saved"):  # every rank's loader says the same
            if (event["event"], event.get("message")) in said:
                return
            said.add((event["event"], event.get("message")))
        if event["event"] == "warning":
            warnings.append(event["message"])
        if progress is not None:
            progress(event)

    started = time.monotonic()
    rank = distributed.run(args, loader_module, saver_module, on_event=on_event, cancel=cancel,
                           handle_signals=handle_signals, torchrun=torchrun)
    if rank != 0:
        return None
    folder = Path(args.save_dir)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    result = Result(folder, files, sum((folder / f).stat().st_size for f in files), time.monotonic() - started,
                    warnings)
    planning.record_rate(result.bytes, result.seconds)  # for a later dry run's estimate
    if progress is not None:
        try:  # the output is committed: a failing callback is not the run's failure (as for every event)
            progress(tracker.finish(folder, len(files), result.bytes, result.seconds))
        except Exception:
            pass
    return result


def _dry_run(args, loader, saver, progress, cancel, handle_signals):
    """convert_argv with --dry-run: a Result with no files and the Plan (dry_run.py). The savers' "saved"
    events are not passed on: nothing was saved."""
    warnings, tracker = [], events.Tracker()

    def on_event(raw):
        event = tracker(raw)
        if event["event"] == "warning":
            warnings.append(event["message"])
        if progress is not None and event["event"] != "saved":
            progress(event)

    started = time.monotonic()
    plan = planning.run(args, loader, saver, on_event, cancel=cancel, handle_signals=handle_signals)
    return Result(Path(args.save_dir), [], 0, time.monotonic() - started, warnings, plan)


def _source(load_dir):
    """The folder --load-dir names: itself, or a Hub id's snapshot folder, resolved here in the parent so
    every loader (Megatron's too) sees a folder. A Hub id that does not resolve fails as the loader's
    missing folder does."""
    try:
        return hub.resolve(load_dir)
    except ConversionError as error:
        error.role, error.side_failed = "loader", True
        raise


def _side_folders(args):
    """--hf-reference-dir and --tokenizer-model (where the plugins take them) may be Hub ids too: resolved
    here like --load-dir, to their snapshot folders of side files (config, tokenizer, code; no weights)."""
    for name in ("hf_reference_dir", "tokenizer_model"):
        if getattr(args, name, None):
            try:
                setattr(args, name, hub.resolve(getattr(args, name), weights=False))
            except ConversionError as error:
                error.role = "arguments"
                raise


@dataclasses.dataclass
class Detected:
    """What a checkpoint folder is, read from its config.json or saved args and the tensors' headers,
    never their data. `parameters` and `bytes`: for an HF folder, every tensor its weight files hold (FP8
    scales included) at its stored size; for a Megatron one, the model its args describe without the
    vocabulary padding (the tensors a loader sends: embeddings, layers, final norm, output layer when
    untied), in its dtype (float32 where Megatron keeps a tensor so), counted once whatever the TP/PP/EP."""
    format: str          # "hf", "mcore" (per-rank torch files), "torch_dist" or "legacy"
    family: str          # HF model_type: llama, mistral, ...
    tp: int
    pp: int
    ep: int
    vp: object           # model chunks per pipeline rank, or None
    dtype: str
    num_layers: int
    loader: str          # the --loader that reads it
    saver: str = None    # the --saver that writes this format (converting from the other side)
    other_saver: str = None   # the --saver that converts it to the other side (Megatron for HF, HF for Megatron)
    other_loader: str = None  # the --loader that reads what other_saver writes
    layers: int = None   # the same as num_layers
    hidden_size: int = None
    attention_heads: int = None
    kv_heads: int = None       # key/value heads (query groups)
    experts: int = None        # routed experts per MoE layer, 0 for a dense model
    vocab_size: int = None     # without padding, where the checkpoint says it
    parameters: int = None
    bytes: int = None

    def as_dict(self):
        return dataclasses.asdict(self)


def detect(path):
    """What the folder at `path` (or Hub id) is; raises ConversionError (kind "input") naming it when it is none."""
    folder = Path(hub.resolve(path))
    require_folder(folder)
    if (folder / hf.CONFIG).is_file():
        return _detect_hf(folder)
    _, iteration_folder = rank_files.read_tracker(folder)
    if torch_dist.is_dist_checkpoint(iteration_folder):
        args = megatron_args.complete(torch_dist.read_common(iteration_folder)["args"], str(iteration_folder))
        kind, legacy, chunks = "torch_dist", False, 1
    else:
        first = rank_files.first_rank_file(iteration_folder)
        state = torch_file.load(first)  # memory-mapped: the weights stay on disk
        require(isinstance(state, dict) and "args" in state, f"{first}: no 'args' in the checkpoint")
        args = megatron_args.complete(state["args"], str(first))
        chunks = [key for key in state if re.fullmatch(r"model\d*", key)]
        require(chunks, f"{first}: no model state in the checkpoint")
        legacy = megatron_schema.detect(state[sorted(chunks)[0]]).legacy
        kind, chunks = ("legacy" if legacy else "mcore"), len(chunks)
    stored = hf_family.stored_config(args) or {}
    family = stored.get("model_type")  # installed or not
    if family is None:
        try:
            family = hf_family.family_for_stream(args, installed_families(), str(folder)).model_type
        except ConversionError:
            pass  # no installed family holds it
    vocab = stored.get("vocab_size") or getattr(args, "vocab_size", None) or args.padded_vocab_size
    parameters, size = _megatron_size(args, vocab)
    return Detected(kind, family, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                    getattr(args, "expert_model_parallel_size", 1) or 1, chunks if chunks > 1 else None,
                    hf_family.DTYPE_NAMES.get(args.params_dtype, str(args.params_dtype)), args.num_layers,
                    "megatron" if legacy else "mcore", _megatron_plugin("saver", kind),
                    _hf_plugin("saver", family), _hf_plugin("loader", family),
                    **_sizes(args), vocab_size=vocab, parameters=parameters, bytes=size)


def _detect_hf(folder):
    config, config_path = hf_stream.read_config(folder)
    by_size = sorted(plugins.installed("loader"),  # the most specific plugin that reads it
                     key=lambda name: len(getattr(plugins.load_plugin("loader", name), "FAMILIES", {})) or 1e9)
    for loader in by_size:
        families = getattr(plugins.load_plugin("loader", loader), "FAMILIES", {})
        try:
            family = hf_family.family_of(config, str(folder / hf.CONFIG), families)
        except ConversionError:
            continue
        weights = hf.HFWeights(folder)
        dtype = weights.dtype(family.embedding)
        untied = not config.get("tie_word_embeddings", family.tied_by_default)
        args = hf_stream.config_args(config, config_path, dtype, untied, family)
        shapes = {name: weights.shape(name) for name in weights.names()}  # headers only
        return Detected("hf", family.model_type, 1, 1, 1, None, hf_family.DTYPE_NAMES.get(dtype, str(dtype)),
                        config.get("num_hidden_layers"), loader, _hf_plugin("saver", family.model_type),
                        _megatron_plugin("saver", "mcore"), _megatron_plugin("loader", "mcore"), **_sizes(args),
                        vocab_size=config.get("vocab_size"), parameters=sum(math.prod(s) for s in shapes.values()),
                        bytes=sum(math.prod(s) * weights.stored_dtype(n).itemsize for n, s in shapes.items()))
    hf_family.family_of(config, str(folder / hf.CONFIG), installed_families())  # raises, naming those known


def _sizes(args):
    """The model's sizes from Megatron args (an HF folder's: those its config.json implies)."""
    return dict(layers=args.num_layers, hidden_size=args.hidden_size, attention_heads=args.num_attention_heads,
                kv_heads=megatron_args.query_groups(args), experts=getattr(args, "num_experts", None) or 0)


def _megatron_size(args, vocab_rows):
    """(parameters, bytes) of the unpadded model `args` describe: the shapes of the messages a loader sends
    ((None, None) when its layers are not ones this converter knows: detect still says the rest)."""
    try:
        return _message_size(args, vocab_rows)
    except ConversionError:
        return None, None


def _message_size(args, vocab_rows):
    shapes = [("word embeddings", (vocab_rows, args.hidden_size))]  # (message key, shape)
    for index in range(args.num_layers):
        shapes += protocol.layer_message_shapes(args, index).items()
    shapes += [("weight", (args.hidden_size,))] * (2 if args.normalization == "LayerNorm" else 1)  # and a bias
    if megatron_args.untied(args):
        shapes.append(("weight", (vocab_rows, args.hidden_size)))
    size = sum(math.prod(shape) * protocol.stored_dtype(key, args.params_dtype).itemsize for key, shape in shapes)
    return sum(math.prod(shape) for _, shape in shapes), size


def _hf_plugin(kind, model_type):
    """The most specific installed `kind` plugin (fewest families) that holds `model_type`, or None."""
    holding = [(len(families), name) for name in plugins.installed(kind)
               if model_type in (families := getattr(plugins.load_plugin(kind, name), "FAMILIES", {}))]
    return min(holding)[1] if holding else None


def _megatron_plugin(kind, detected_format):
    """The first installed `kind` plugin that declares the Megatron format of a Detected.format, or None."""
    wanted = {"mcore": "torch"}.get(detected_format, detected_format)
    return next((name for name in plugins.installed(kind)
                 if wanted in getattr(plugins.load_plugin(kind, name), "MEGATRON_FORMATS", ())), None)


def installed_families():
    """{model_type: Family} of every installed HF plugin, loaders first, in plugin-name order."""
    every = {}
    for kind in ("loader", "saver"):
        for name in plugins.installed(kind):
            for model_type, family in getattr(plugins.load_plugin(kind, name), "FAMILIES", {}).items():
                every.setdefault(model_type, family)
    return every


def supported():
    """The support matrix, one entry per HF family, built from what the installed plugins declare (HF
    plugins: FAMILIES and NOTES; Megatron plugins: MEGATRON_FORMATS and FORMAT_FLAGS). For each
    direction: the HF plugin, and per Megatron format whether it works, why not, and the command line.
    A family's notes are its own, then what the generic HF loader and saver (which run every FAMILIES
    entry) do with FP8 weights and with multi-token-prediction layers."""
    fp8 = ("FP8 block-scaled weights (quantization_config fp8, *_scale_inv) are dequantized on the way in; the way "
           "back writes the dequantized model without quantization_config")  # formats/fp8.py, for every family
    declared = {kind: {name: plugins.load_plugin(kind, name) for name in plugins.installed(kind)}
                for kind in ("loader", "saver")}
    megatron = {kind: [(name, module) for name, module in declared[kind].items() if hasattr(module, "MEGATRON_FORMATS")]
                for kind in ("loader", "saver")}
    rows = {}
    for kind, direction in (("loader", "hf_to_megatron"), ("saver", "megatron_to_hf")):
        other = "saver" if kind == "loader" else "loader"
        for name, module in declared[kind].items():
            for family in getattr(module, "FAMILIES", {}).values():
                row = rows.setdefault(family.model_type, {
                    "family": family.model_type, "architectures": list(family.architectures),
                    "package": plugins.distribution(module), "notes": [],
                    "hf_to_megatron": None, "megatron_to_hf": None})
                notes = getattr(module, "NOTES", ())  # a module's notes, for plugins written before Family.notes
                mtp = (f"multi-token-prediction layers ({family.mtp.count}, Megatron's mtp_num_layers) convert both ways"
                       if family.mtp else
                       "refuses multi-token-prediction layers (Megatron's mtp_num_layers) until they are supported")
                notes = [*family.notes, *([notes] if isinstance(notes, str) else notes), fp8, mtp]
                row["notes"] += [n for n in notes if n not in row["notes"]]
                if row[direction] is None:
                    row[direction] = {"plugin": name, "formats": _format_cells(family, kind, name, megatron[other])}
    return [rows[name] for name in sorted(rows)]


def _format_cells(family, kind, hf_plugin, megatron_plugins):
    """Per Megatron format: supported or not (and why), and the command line that converts it."""
    cells = []
    for fmt in megatron_schema.FORMATS:
        plugin = next(((n, m) for n, m in megatron_plugins if fmt in m.MEGATRON_FORMATS), None)
        missing = [f"{setting} ({why})" for setting, why in megatron_schema.FORMAT_LIMITS.get(fmt, {}).items()
                   if family.settings.get(setting)]
        if plugin is None or missing:
            cells.append({"format": fmt, "supported": False, "command": None,
                          "note": "; ".join(missing) or f"no installed plugin {'writes' if kind == 'loader' else 'reads'} it"})
            continue
        flags = getattr(plugin[1], "FORMAT_FLAGS", {}).get(fmt, "")
        if kind == "loader":
            command = f"--loader {hf_plugin} --saver {plugin[0]}{' ' + flags if flags else ''} --load-dir HF_DIR --save-dir MEGATRON_DIR"
        else:
            command = f"--loader {plugin[0]} --saver {hf_plugin} --load-dir MEGATRON_DIR --save-dir HF_DIR"
        cells.append({"format": fmt, "supported": True, "note": "", "command": "python -m converter_core --model-type GPT " + command})
    return cells
