"""The command line: convert.py's flags and behaviour, a thin layer over converter_core.api, with a
progress display in the parent (children print nothing themselves)."""

import dataclasses
import json
import os
import signal
import sys

from converter_core import __version__, api, distributed, flags, plugins, protocol, report
from converter_core.errors import EXIT_INPUT, ConversionError, Interrupted
from converter_core.options import UsageError, _Parser, base_parser


class Display:
    """Shows the run's events: `auto` gives a progress bar on a terminal (layers, GB written, rate,
    ETA), the loader's and saver's notes and warnings, and a summary; `json` one JSON object per line
    on stdout; `quiet` nothing."""

    def __init__(self, mode):
        self.mode, self.bar = mode, None
        self.cwd = os.getcwd()

    def __call__(self, event):
        if self.mode == "json":
            print(json.dumps(event, default=str), flush=True)
        elif self.mode == "auto":
            self._show(event)

    def _show(self, event):
        kind = event["event"]
        if kind == "start" and sys.stderr.isatty() and event.get("rank", 0) == 0:  # one bar for the whole job
            from tqdm import tqdm
            self.bar = tqdm(total=event["messages"], unit="msg", desc="converting", file=sys.stderr)
        elif kind in ("sent", "written"):
            if self.bar is not None:  # the job's state comes with the event (converter_core.events)
                self.bar.n = round(event["fraction"] * self.bar.total)
                self.bar.set_postfix_str(f"{event['bytes_done'] / 1e9:.2f} GB")
        elif kind == "finish":
            self.close()
            rate = event["bytes"] / max(event["seconds"], 1e-9) / 1e9
            print(f"wrote {event['save_dir']}: {event['files']} files, {event['bytes'] / 1e9:.3f} GB "
                  f"in {event['seconds']:.1f} s ({rate:.2f} GB/s)", flush=True)
            if event["save_dir"] == self.cwd and not os.path.samefile(".", self.cwd):  # an HF output took its place
                print(f"note: the output replaced the working directory; `cd {self.cwd}` to see it", flush=True)
        elif (line := protocol.event_line(event)) is not None:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["detect"], ["supported"], ["report"]):
        return _inspect(argv)
    if argv[:1] == ["verify"]:
        return _verify(argv[1:])
    if "--version" in argv:
        print(f"converter_core {__version__}")
        sys.exit(0)
    if "--list-plugins" in argv:
        for kind in ("loader", "saver"):
            print(f"{kind}s: {', '.join(plugins.installed(kind))}")
        sys.exit(0)
    display = Display("auto")
    launch, json_errors = distributed.torchrun_launch(), False
    try:
        known, _ = base_parser(add_help=False, required=False).parse_known_args(argv)
        display.mode = "quiet" if known.quiet else known.progress
        json_errors = display.mode == "json"
        if launch is not None and launch.rank != 0:  # rank 0 shows the whole job
            display.mode = "quiet"
        result = api.convert_argv(argv, progress=display, handle_signals=True, torchrun=True)
        _ignore_stop_signals()
        _show_plan(None if result is None else result.plan, display)
        status = 0
    except ConversionError as error:
        _ignore_stop_signals()
        display.close()
        if getattr(error, "quiet", False):  # another rank says it (converter_core.distributed)
            sys.exit(error.status)
        if isinstance(error, UsageError):
            sys.stderr.write(error.usage)
        if json_errors:
            rank = {"rank": error.rank} if getattr(error, "rank", None) is not None else {}
            print(json.dumps({"event": "error", "message": error.line(), "role": error.role, "kind": error.kind,
                              **rank}), flush=True)
        print(f"converter_core: error: {error.line()}", file=sys.stderr, flush=True)
        status = error.status
    except Interrupted as stop:  # before the job started: torchrun stopping its other ranks, rank 0 says why
        if launch is None or launch.rank == 0:
            raise
        status = 128 + stop.signum
    sys.exit(status)


def _show_plan(plan, display):
    """--dry-run's answer: the plan as lines (a "plan" event in --progress json), or nothing for a real run."""
    if plan is None or display.mode == "quiet":
        return
    display.close()
    if display.mode == "json":
        print(json.dumps({"event": "plan", **dataclasses.asdict(plan)}, default=str), flush=True)
        return
    print("dry run, nothing written; a real run writes:")
    for line in plan.lines():
        print(line)


def _ignore_stop_signals():
    """The run has ended, committed or not: a stop now would only cut its last line short."""
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)


def _inspect(argv):
    """`detect PATH` and `supported`: what a folder is, what the installed plugins convert, as JSON;
    `report [--output-dir DIR]`: the latter as supported-models.md and .pdf, a document to send."""
    try:
        if argv[0] == "detect":
            if len(argv) != 2:
                raise UsageError("detect takes one folder", "usage: converter_core detect PATH\n")
            print(json.dumps(api.detect(argv[1]).as_dict(), indent=2))
        elif argv[0] == "report":
            if argv[1:] and (len(argv) != 3 or argv[1] != "--output-dir"):
                raise UsageError("report takes only --output-dir DIR", "usage: converter_core report [--output-dir DIR]\n")
            for path in report.write(api.supported(), argv[2] if argv[1:] else "."):
                print(f"wrote {path}")
        else:
            print(json.dumps(api.supported(), indent=2))
        status = 0
    except ConversionError as error:
        print(f"converter_core: error: {error.line()}", file=sys.stderr, flush=True)
        status = error.status or EXIT_INPUT
    sys.exit(status)


def _verify(argv):
    """`verify A B [--atol X] [--logits]`: exit 0 when the two checkpoints hold the same tensors (within X),
    else 1 with the first tensors that differ; --logits adds a line with the largest logit difference."""
    from converter_core import verification
    parser = _Parser(prog="converter_core verify", allow_abbrev=False,
                     description="Compare two checkpoints of one model, in any formats, tensor by tensor.")
    parser.add_argument("a", metavar="A", help="checkpoint folder (HF, Megatron-Core, torch_dist, legacy) or Hub id")
    parser.add_argument("b", metavar="B", help="the other checkpoint")
    parser.add_argument("--atol", type=flags.non_negative_float, default=0.0,
                        help="largest absolute difference allowed; dtypes may then differ (default 0: identical "
                             "values and dtypes)")
    parser.add_argument("--logits", action="store_true",
                        help="also run both models' forward on a few tokens on the CPU (transformers, float32; a "
                             "Megatron side converted to HF in a temporary folder) and print the largest logit "
                             "difference")
    try:
        options = parser.parse_args(argv)
        result = verification.verify(options.a, options.b, options.atol, logits=options.logits, handle_signals=True)
    except ConversionError as error:
        _ignore_stop_signals()
        if isinstance(error, UsageError):
            sys.stderr.write(error.usage)
        print(f"converter_core: error: {error.line()}", file=sys.stderr, flush=True)
        sys.exit(error.status)
    _ignore_stop_signals()
    for note in result.notes:
        print(note)
    if result.logits_max_abs_diff is not None:
        print(f"logits: max abs diff {result.logits_max_abs_diff:g} over {result.logits_tokens} tokens "
              "(float32, transformers)")
    differing = result.differing()
    if not differing:
        same = "identical" if result.identical else f"within --atol {result.atol:g} (largest difference " \
                                                   f"{result.max_abs_diff:g})"
        print(f"{same}: {len(result.rows)} tensors of {result.a} and {result.b}")
        sys.exit(0)
    for row in differing[:verification.SHOWN]:
        print(f"differs: {row.name}: max abs diff {row.max_abs_diff:g}"
              f" ({row.dtype_a} {list(row.shape_a)} against {row.dtype_b} {list(row.shape_b)})")
    more = len(differing) - verification.SHOWN
    print(f"{len(differing)} of {len(result.rows)} tensors differ{f' ({more} more not shown)' if more > 0 else ''}; "
          f"largest difference {result.max_abs_diff:g}")
    sys.exit(1)
