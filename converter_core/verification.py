"""verify: are two checkpoints of one model, in any formats, the same tensors? Each side's loader (the one
detect names) runs in its own process and streams its messages (full tensors in Megatron's layout, one
layer at a time) to a comparing process, which reads both streams in step, key by key, and reports one
row per tensor to the parent. Memory stays at a few layers per side, whatever the model's size.

(Named verification, not verify: converter_core.verify is the function.)"""

import dataclasses
import math
import os
import sys
import tempfile
from pathlib import Path

import torch

from converter_core import hub, layout, options, orchestrator, plugins, protocol
from converter_core.errors import EXIT_USAGE, ConversionError, first_line, require

CHUNK_ELEMENTS = 1 << 22  # a tensor is compared in row blocks of about this many elements (float64: 32 MiB)
SHOWN = 10  # differing tensors the command line names
LOGIT_TOKENS = 8  # tokens of the forward that --logits runs on both sides


@dataclasses.dataclass
class Row:
    """One tensor of both checkpoints: its message-level name ("transformer layer 1 / mlp l1 weight"),
    each side's shape and dtype, and the largest absolute difference of their values (compared in float64;
    an embedding or output table over its true vocabulary rows only)."""
    name: str
    shape_a: tuple
    shape_b: tuple
    dtype_a: str
    dtype_b: str
    max_abs_diff: float
    rows_compared: int = None  # vocabulary tables: the true rows compared (the padding is not)

    @property
    def identical(self):
        return self.max_abs_diff == 0 and self.dtype_a == self.dtype_b


@dataclasses.dataclass
class Verified:
    """verify()'s answer. `identical`: every tensor has equal values and the same dtype on both sides;
    `passed`: identical when atol is 0, else every tensor's values within atol (dtypes may then differ)."""
    a: str               # the two checkpoints, as given
    b: str
    atol: float          # the difference allowed (0: identical values and dtypes asked)
    rows: list           # a Row per tensor, in stream order
    notes: list          # the loaders' notes and warnings
    logits_max_abs_diff: float = None  # logits=True: the largest |logit A - logit B| (float32, transformers)
    logits_tokens: int = None          # over this many tokens

    @property
    def identical(self):
        return all(row.identical for row in self.rows)

    @property
    def max_abs_diff(self):
        return max((row.max_abs_diff for row in self.rows), default=0.0)

    @property
    def passed(self):
        return self.identical if self.atol == 0 else self.max_abs_diff <= self.atol

    def differing(self):
        """The rows that fail the check, in stream order."""
        return [row for row in self.rows if not row.identical and (self.atol == 0 or row.max_abs_diff > self.atol)]


def verify(a, b, atol=0.0, *, logits=False, progress=None, cancel=None, handle_signals=False):
    """Compare checkpoint folders (or Hub ids) `a` and `b`, tensor by tensor. Returns Verified; raises
    ConversionError (one line) when a side is not a checkpoint or the two are not one model (layer counts,
    keys or shapes differ). `logits=True` also runs both models' forward on a few tokens on the CPU through
    transformers in float32 (a Megatron side converted to HF first, in a temporary folder) and gives the
    largest logit difference. `progress`, `cancel`, `handle_signals` as for convert()."""
    from converter_core import api
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not (math.isfinite(atol) and atol >= 0):
        raise ConversionError(f"atol must be a finite number >= 0, got {atol!r}", role="arguments", status=EXIT_USAGE)
    sides, detected = [], []
    for path in (a, b):
        try:
            folder = hub.resolve(path)
            detected.append((folder, api.detect(folder)))
        except ConversionError as error:
            error.role = "loader"
            raise
        sides.append(_side_args(folder, detected[-1][1].loader))
    rows, notes = [], []

    def on_event(event):
        if event["event"] == "compared":
            rows.append(Row(event["name"], tuple(event["shape_a"]), tuple(event["shape_b"]), event["dtype_a"],
                            event["dtype_b"], event["max_abs_diff"], event.get("rows_compared")))
        elif event["event"] in ("note", "warning"):
            notes.append(event["message"])
        if progress is not None:
            progress(event)

    (args_a, loader_a), second = sides
    args_a.sides = (str(a), str(b))  # for the comparing process's lines
    try:
        orchestrator.run(args_a, loader_a, sys.modules[__name__], on_event=on_event, cancel=cancel,
                         handle_signals=handle_signals, second_loader=second)
    except ConversionError as error:
        if error.role == "second loader":
            error.role = "loader"  # its message names its own folder
        elif error.role == "saver":  # the comparison: the two are not one model
            error.role, error.side_failed = None, False
        raise
    result = Verified(str(a), str(b), float(atol), rows, notes)
    if logits:
        result.logits_max_abs_diff, result.logits_tokens = compare_logits(detected, cancel)
    return result


def compare_logits(sides, cancel=None):
    """(largest |logit difference|, tokens) of the two `sides` ((folder, Detected) each) on the same few
    tokens, one model in memory at a time; a Megatron side is converted to HF by the HF saver detect names."""
    from converter_core import api
    vocab = min(detected.vocab_size for _, detected in sides)
    tokens = torch.randint(vocab, (1, LOGIT_TOKENS), generator=torch.Generator().manual_seed(0))
    outputs = []
    for source, detected in sides:
        with tempfile.TemporaryDirectory(prefix="converter_core-verify-") as scratch:
            folder = source
            if detected.format != "hf":
                require(detected.other_saver, f"{source}: no installed HF saver writes {detected.family}; "
                                              "--logits needs one", path=source)
                folder = Path(scratch, "hf")
                api.convert(detected.loader, detected.other_saver, source, folder, cancel=cancel)
            outputs.append(_forward(folder, tokens)[..., :vocab])
    return float((outputs[0] - outputs[1]).abs().max()), LOGIT_TOKENS


def _forward(folder, tokens):
    """The logits of the HF model in `folder` (float32, CPU; remote code is not run)."""
    import transformers
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as error:
        raise ConversionError(f"{folder}: transformers cannot load it for the logits ({first_line(error)})",
                              path=folder) from None
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


def _side_args(folder, loader_name):
    """(args, loader module) for reading `folder` with the loader `loader_name`, its flags at their defaults."""
    loader = plugins.load_plugin("loader", loader_name)
    parser = options.base_parser(required=False)
    loader.add_arguments(parser)
    add_arguments(parser)
    args = parser.parse_args(["--model-type", "GPT", "--loader", loader_name, "--saver", "verify",
                              "--load-dir", os.fspath(folder)])
    args.loader = plugins.canonical(loader_name)
    return args, loader


def add_arguments(parser):
    protocol.reads_mtp_layers(parser)  # the loaders send multi-token-prediction layers: compared too


def save_checkpoint(queues, args):
    """The comparing process (the orchestrator's saver): both streams, message by message."""
    torch.set_num_threads(1)
    stall = protocol.stall_timeout(args)
    a, b = (protocol.Receiver(queue, stall_timeout=stall) for queue in queues)
    A, B = args.sides
    md_a, md_b = a.metadata(), b.metadata()
    for field, what in (("num_layers", "layers"), ("mtp_num_layers", "multi-token-prediction layers"),
                        ("hidden_size", "hidden size"), ("true_vocab_size", "vocabulary entries")):
        one, other = getattr(md_a, field, 0) or 0, getattr(md_b, field, 0) or 0
        require(one == other or field == "true_vocab_size" and not (one and other),  # unknown: all rows compared
                f"{A} and {B} are not one model: {what} {one} against {other}")
    require(bool(md_a.output_layer) == bool(md_b.output_layer),
            f"{A} and {B} are not one model: {A if md_a.output_layer else B} has an output layer, "
            f"{B if md_a.output_layer else A} ties it to the embeddings")
    rows = md_a.true_vocab_size or md_b.true_vocab_size or None
    names = [protocol.EMBEDDINGS, *map(protocol.layer_name, range(md_a.num_layers)), protocol.FINAL_NORM]
    names += [protocol.OUTPUT_LAYER] * bool(md_a.output_layer)
    names += [protocol.mtp_layer_name(depth) for depth in range(getattr(md_a, "mtp_num_layers", 0) or 0)]
    for name in names:
        one, other = a.get(name), b.get(name)
        keys = [key for key in one if key != "name"]
        require(sorted(keys) == sorted(key for key in other if key != "name"),
                f'{A} and {B} are not one model: "{name}" holds {_keys(one)} against {_keys(other)}')
        for key in keys:
            table = name in (protocol.EMBEDDINGS, protocol.OUTPUT_LAYER)
            _compare(f"{name} / {key}", one[key], other[key], rows if table else None, (A, B))
    a.done()
    b.done()


def _keys(message):
    return ", ".join(sorted(key for key in message if key != "name"))


def _compare(name, one, other, rows, sides):
    """Report one "compared" event for tensors `one` (A) and `other` (B); `rows`: compare only the first
    that many (vocabulary tables: the true size either metadata gives; the padding is Megatron's and
    differs with TP), None for all."""
    one, other = layout.tensor_of(one), layout.tensor_of(other)
    shape_a, shape_b = tuple(one.shape), tuple(other.shape)
    if rows is not None:
        require(min(shape_a[0], shape_b[0]) >= rows,
                f"{name}: {min(shape_a[0], shape_b[0])} rows, fewer than the vocabulary's {rows}")
        one, other = one[:rows], other[:rows]
    require(one.shape == other.shape, f"{sides[0]} and {sides[1]} are not one model: {name} has shape "
                                      f"{list(shape_a)} against {list(shape_b)}")
    protocol.report("compared", name=name, shape_a=list(shape_a), shape_b=list(shape_b),
                    dtype_a=str(one.dtype).replace("torch.", ""), dtype_b=str(other.dtype).replace("torch.", ""),
                    max_abs_diff=_max_abs_diff(one, other), rows_compared=rows)


def _max_abs_diff(one, other):
    """The largest |a - b| over the elements, in float64 (exact for every float16, bfloat16 and float32
    value); NaN against NaN, and an infinity against the same one, count as equal; NaN against a number
    is an infinite difference."""
    flat_a, flat_b = one.reshape(-1), other.reshape(-1)
    largest = 0.0
    for start in range(0, flat_a.numel(), CHUNK_ELEMENTS):
        x = flat_a[start:start + CHUNK_ELEMENTS].to(torch.float64)
        y = flat_b[start:start + CHUNK_ELEMENTS].to(torch.float64)
        same = (x == y) | (x.isnan() & y.isnan())
        if not bool(same.all()):
            largest = max(largest, float((x - y).abs().nan_to_num(nan=math.inf)[~same].max()))
    return largest
