"""Megatron convert.py's queue protocol, exactly: a metadata namespace first, then named messages of
full (unsharded) tensors in Megatron layout, then "done"; the string "exit" means the loader failed.

Both directions use the same stream, so any of our loaders feeds any saver, ours or Megatron's.
"""

import argparse
import queue as queue_module
import types

import torch

from converter_core import layout, share
from converter_core.errors import ConversionError, Interrupted, require
from converter_core.formats import torch_file
from converter_core.megatron import args as megatron_args, keys as message_keys

EMBEDDINGS = "embeddings"  # the first message: {"word embeddings": [vocab, hidden]}
FINAL_NORM = "final norm"  # after the layers: {"weight"} (and "bias" for LayerNorm)
OUTPUT_LAYER = "output layer"  # untied models only: {"weight": [vocab, hidden]}
# Multi-token prediction: md.mtp_num_layers > 0 announces that many "mtp layer i" messages after the output
# layer (or the final norm when tied), before "done"; loaders send them only to a saver that declared it
# reads them (reads_mtp_layers), since Megatron's own savers take any message there for a stray one and
# go on without its weights.
SAVER_READS_MTP = "saver_reads_mtp"  # the args attribute a saver's declaration sets
SAVER_TAKES_ROWS = "saver_takes_rows"  # the args attribute takes_rows sets
DONE = "done"  # the string ending a complete stream
EXIT = "exit"  # the string a failing loader puts instead, so the saver stops
EXIT_PUT_SECONDS = 10
LOADER_EXITED = "loader exited, exiting saver"  # what a saver says when it stops on the loader's "exit"


def stall_timeout(args):
    """The watchdog a loader or saver passes to send_model / Receiver: how long it waits on the other
    side before calling the run stalled (--stall-timeout, on the args our orchestrator gives each side).
    Absent (as under Megatron's convert.py), or 0, waits forever."""
    return getattr(args, "stall_timeout", None) or None


def layer_name(index):
    """The name of layer `index`'s message, as Megatron's loaders send it."""
    return f"transformer layer {index}"


def mtp_layer_name(index):
    """The name of multi-token-prediction layer `index`'s message (0 for the first depth). It holds the
    keys of a transformer layer built like the model's last one plus the MTP parts (enorm, hnorm, eh proj,
    final norm weight): layer_message_shapes(args, args.num_layers + index)."""
    return f"mtp layer {index}"


def reads_mtp_layers(parser):
    """A saver's declaration, in its add_arguments: it reads the "mtp layer i" messages that follow the
    output layer when md.mtp_num_layers > 0. Without it our loaders refuse a model with multi-token-
    prediction layers instead of sending them to a saver that would drop them."""
    parser.set_defaults(**{SAVER_READS_MTP: True})


def takes_rows(parser):
    """A saver's declaration, in its add_arguments: its Receiver takes layout.Rows and layout.Columns
    (rows=True), TP shards as a Megatron loader reads them, unconcatenated. Without it a loader's send
    delivers plain tensors (layout.joined_on_arrival), which any saver, Megatron's own included, reads."""
    parser.set_defaults(**{SAVER_TAKES_ROWS: True})


def saver_takes_rows(args):
    """What a loader passes to send_model as `rows`: whether the saver declared takes_rows."""
    return bool(getattr(args, SAVER_TAKES_ROWS, False))


def check_mtp_reader(args, md, where):
    """A loader's check before it sends a model with multi-token-prediction layers: the saver declared
    it reads them (reads_mtp_layers), else one line, nothing sent."""
    count = getattr(md, "mtp_num_layers", 0) or 0
    require(not count or getattr(args, SAVER_READS_MTP, False),
            f"{where}: the model has {count} multi-token-prediction layer(s) (mtp_num_layers), and the saver "
            f"{getattr(args, 'saver', '')!s} does not declare that it reads them (plugin.reads_mtp_layers); refused "
            "rather than converted without them")


def make_metadata(args, *, true_vocab_size, previous_tp=1, previous_pp=1, iteration=1,
                  consumed_train_samples=0, consumed_valid_samples=0):
    """The `md` namespace Megatron's savers read, derived from the model's Megatron args (one source of truth)."""
    return types.SimpleNamespace(
        model_type="GPT",
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        seq_length=args.seq_length,
        num_attention_heads=args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings,
        tokenizer_type=args.tokenizer_type,
        iteration=iteration,
        params_dtype=args.params_dtype,
        bert_binary_head=False,
        output_layer=args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        linear_bias=args.add_bias_linear,
        qkv_bias=args.add_qkv_bias or args.add_bias_linear,
        norm_has_bias=args.normalization == "LayerNorm",
        swiglu=args.swiglu,
        previous_tensor_parallel_size=previous_tp,
        previous_pipeline_parallel_size=previous_pp,
        true_vocab_size=true_vocab_size,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        checkpoint_args=args,
        consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=consumed_valid_samples,
        use_legacy_models=bool(getattr(args, "use_legacy_models", False)),
        use_mcore_models=not getattr(args, "use_legacy_models", False),
        mtp_num_layers=megatron_args.mtp_layers(args),
    )


# Megatron features whose tensors or maths this converter does not carry: refused, never dropped.
_UNSUPPORTED = {"mtp_use_repeated_layer": "one multi-token-prediction layer repeated over the depths",
                "mtp_standalone": "multi-token-prediction layers in a pipeline stage of their own",
                "mtp_hybrid_override_pattern": "hybrid multi-token-prediction layers",
                "heterogeneous_layers_config_path": "heterogeneous layers",
                "heterogeneous_layers_config_encoded_json": "heterogeneous layers"}
# Settings a Llama-layout HF config cannot say.
_NOT_IN_HF = {"rotary_interleaved": "interleaved rotary embeddings",
              "rotary_seq_len_interpolation_factor": "rotary sequence-length interpolation"}


def check_supported(md, where, to_hf=False):
    """Our plugins handle dense decoder-only GPT models with rotary positions; anything else is refused
    in one line instead of being written as a different model."""
    require(md.model_type == "GPT", f"{where}: model type {md.model_type} is not supported (GPT only)")
    require(md.position_embedding_type in ("rope", "yarn"),
            f"{where}: position embedding {md.position_embedding_type!r} is not supported (rope or yarn only)")
    args = md.checkpoint_args
    for name, what in _UNSUPPORTED.items():
        require(not getattr(args, name, None), f"{where}: {what} ({name}={getattr(args, name, None)!r}) is not supported")
    announced, layers = getattr(md, "mtp_num_layers", 0) or 0, megatron_args.mtp_layers(args)
    require(announced == layers, f"{where}: the model args say mtp_num_layers={layers}, the loader's metadata "
                                 f"announces {announced} multi-token-prediction layer message(s) (mtp_num_layers): "
                                 "a loader that does not send them would drop their weights")
    if to_hf:
        for name, what in _NOT_IN_HF.items():
            require(not getattr(args, name, None), f"{where}: {what} has no Hugging Face equivalent")


class exit_on_failure:
    """Megatron's loader contract: on any failure put "exit" on the queue, then re-raise, so a saver
    (ours or Megatron's, even under convert.py) stops instead of waiting forever."""

    def __init__(self, queue):
        self.queue = queue

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if kind is None or kind is Interrupted or kind is SystemExit and error.code in (None, 0):
            return False  # an interrupted run's saver is being stopped too
        try:  # a saver that died reads nothing; under our orchestrator the parent stops it at once anyway
            self.queue.put(EXIT, timeout=EXIT_PUT_SECONDS if _event_sink is None else 0)
        except queue_module.Full:
            pass
        return False


# Progress events. Our orchestrator gives each child a way to the parent (set_event_sink); without one
# (a plugin run by Megatron's convert.py) an event is printed as the line convert.py would show.
_event_sink = None


def set_event_sink(put):
    global _event_sink
    _event_sink = put


def report(event, **fields):
    """One progress event: start (messages, layers), sent / written (name, bytes), note, warning, saved."""
    fields["event"] = event
    if _event_sink is not None:
        _event_sink(fields)
    else:
        print(event_line(fields), flush=True)


def event_line(fields):
    """The line a person reads for an event, or None for events only a progress display shows."""
    event = fields["event"]
    if event in ("sent", "written"):
        return f"{'sending' if event == 'sent' else 'received'} {fields['name']}"
    if event == "warning":
        return f"warning: {fields['message']}"
    return fields.get("message")


def message_bytes(message):
    return sum(value.numel() * value.element_size() for value in message.values() if hasattr(value, "element_size"))


def _put(queue, value, what, stall_timeout):
    try:
        queue.put(value, timeout=stall_timeout or None)
    except queue_module.Full:
        raise ConversionError(f"stalled: the saver took no message for {stall_timeout:g} s "
                              f"while {what} waited (--stall-timeout)") from None


def message_count(md):
    """Messages between the metadata and "done": embeddings, one per layer, final norm, output layer, one
    per multi-token-prediction layer."""
    return md.num_layers + 2 + bool(md.output_layer) + (getattr(md, "mtp_num_layers", 0) or 0)


def send(queue, name, message, count=None, total=None, stall_timeout=None, rows=False):
    """Megatron's queue_put: name the message, enqueue, report progress (count of total). `stall_timeout`:
    seconds to wait for room on the queue before calling the run stalled (None waits forever). `rows`:
    the saver takes Rows and Columns as they are (saver_takes_rows); otherwise each arrives as a tensor."""
    size = message_bytes(message)
    if not rows:
        message = {key: layout.joined_on_arrival(value) for key, value in message.items()}
    message["name"] = name
    _put(queue, message, f'"{name}"', stall_timeout)
    report("sent", name=name, bytes=size, count=count, total=total)


def send_model(queue, md, messages, stall_timeout=None, rows=False):
    """Send metadata, every (name, tensors) pair from `messages` in order, then "done"; `stall_timeout` and
    `rows` as for send (a loader passes stall_timeout(args) and saver_takes_rows(args))."""
    total = message_count(md)
    report("start", layers=md.num_layers, messages=total)
    _put(queue, md, "the metadata", stall_timeout)
    for count, (name, tensors) in enumerate(messages, 1):
        send(queue, name, tensors, count, total, stall_timeout, rows)
    _put(queue, DONE, '"done"', stall_timeout)


class Receiver:
    """The saver's end of the queue: Megatron's queue_get and check_message, raising instead of exit()."""

    def __init__(self, queue, checking=True, rows=False, stall_timeout=None):
        """`rows`: the saver takes layout.Rows and layout.Columns where a message holds a tensor (and has
        declared takes_rows, so that loaders send them); otherwise any that arrive are concatenated.
        `stall_timeout`: seconds to wait for each message before calling the run stalled (a saver passes
        stall_timeout(args); None waits forever)."""
        self.rows = rows
        self.queue = queue
        self.stall_timeout = stall_timeout or None
        self.checking = checking
        self.received_bytes = self.written = 0
        self.total = None

    def _get(self):
        try:
            value = self.queue.get(timeout=self.stall_timeout)
        except queue_module.Empty:
            raise ConversionError(f"stalled: no message from the loader for {self.stall_timeout:g} s "
                                  "(--stall-timeout)") from None
        if isinstance(value, str) and value == EXIT:
            raise ConversionError(LOADER_EXITED)  # its own report says why
        return value

    def metadata(self):
        """The metadata namespace, its checkpoint_args completed and made storable whichever loader
        (and Megatron-LM version) sent them."""
        md = self._get()
        require(isinstance(md, types.SimpleNamespace) or hasattr(md, "checkpoint_args"),
                f"expected the metadata namespace first, got {type(md).__name__}")
        require(isinstance(getattr(md, "checkpoint_args", None), argparse.Namespace),
                "the loader's metadata has no checkpoint_args Namespace")
        md.checkpoint_args = megatron_args.complete(torch_file.storable_namespace(md.checkpoint_args),
                                                    "metadata checkpoint_args")
        self.total = message_count(md)
        return md

    def get(self, name, shapes=None):
        """The next message, which must be `name`; with `shapes` ({key: shape}, None for any size) every
        key must be present with that shape."""
        message = self._get()
        if not isinstance(message, dict):
            raise ConversionError(f'expected message "{name}", got {type(message).__name__}')
        if self.checking and message.get("name") != name:
            raise ConversionError(f'unexpected message: expecting "{name}" but got "{message.get("name")}"')
        for key, shape in (shapes or {}).items():
            require(key in message, f'message "{name}" lacks {key!r}')
            got = tuple(getattr(message[key], "shape", ()))
            require(len(got) == len(shape) and all(w is None or w == g for w, g in zip(shape, got)),
                    f'message "{name}": {key!r} has shape {list(got)}, the model args imply {list(shape)}')
        self.received_bytes = message_bytes(message)
        if not self.rows:
            message.update({key: layout.tensor_of(value) for key, value in message.items()})
        return message

    def done(self):
        value = self._get()
        if not (isinstance(value, str) and value == DONE):
            name = value.get("name") if isinstance(value, dict) else type(value).__name__
            raise ConversionError(f'got more data ({name!r}) but was expecting "done"')

    def check_consumed(self, message):
        """Every key a saver did not pop is an error unless --no-checking (as Megatron's check_message);
        the saver calls it when done with a message, so it also reports the message written."""
        leftover = sorted(k for k in message if k != "name")
        require(not self.checking or not leftover, f"unexpected values in {message.get('name')}: "
                                                   f"{', '.join(leftover)} (use --no-checking to ignore)")
        self.written += 1
        report("written", name=message.get("name"), bytes=self.received_bytes, count=self.written, total=self.total)


# The keys of a "transformer layer N" message and what each holds (message_keys' table, registered keys
# included); layer_message_shapes says which ones a model's layer has.
LAYER_KEYS = message_keys.DESCRIPTIONS

# Built-in message tensors that stay float32 whatever the model's dtype; stored_dtype knows registered ones too.
FLOAT32_KEYS = tuple(key.name for key in message_keys.BUILT_IN if key.dtype == torch.float32)
stored_dtype = message_keys.stored_dtype


def placeholder(args, index, dtype):
    """Layer `index`'s message as a loader sends it to a rank whose saver does not need it (share.skipped):
    every key with its shape and dtype, no data (one element, expanded), marked share.SKIPPED."""
    message = {key: torch.zeros((), dtype=stored_dtype(key, dtype)).expand(shape)
               for key, shape in layer_message_shapes(args, index).items()}
    message[share.SKIPPED] = True
    return message


def layer_message_shapes(args, index=0):
    """{message key: full shape} of the "transformer layer `index`" message of a model of `args`: exactly
    the keys that layer has, in the order they are written. Index num_layers + i gives the "mtp layer i"
    message's (mtp_layer_name)."""
    return {key.name: key.size(args) for key in message_keys.layer_keys(args, index)}
