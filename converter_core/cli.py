"""convert.py's command line: parsed twice, so the chosen loader and saver can add their own flags."""

import argparse
import sys
from pathlib import Path

from converter_core import flags, orchestrator, plugins
from converter_core.errors import ConversionError


def base_parser(add_help=True, required=True):
    parser = argparse.ArgumentParser(prog="converter_core", description="Megatron Checkpoint Converter Arguments",
                                     allow_abbrev=False, conflict_handler="resolve", add_help=add_help,
                                     epilog=plugins.installed_summary())
    parser.add_argument("--model-type", type=str, required=required, choices=["GPT", "BERT"],
                        help="model family (the built-in plugins convert GPT models only)")
    parser.add_argument("--loader", type=str, default="megatron", help="loader plugin name (default megatron)")
    parser.add_argument("--saver", type=str, default="megatron", help="saver plugin name (default megatron)")
    parser.add_argument("--load-dir", type=str, required=required, help="source checkpoint folder")
    parser.add_argument("--save-dir", type=str, required=required, help="output folder")
    parser.add_argument("--max-queue-size", type=flags.queue_size, default=2,
                        help="messages (one per layer) in flight between loader and saver, 0 for no limit; "
                             "convert.py's default is 50, ours 2 so memory stays at a few layers")
    parser.add_argument("--no-checking", action="store_false", dest="checking",
                        help="do not check message order and leftover keys")
    parser.add_argument("--stall-timeout", type=flags.seconds, default=600,
                        help="seconds the loader or saver waits on the other before the run is called stalled "
                             "and stopped (default 600; 0 waits forever)")
    return parser


def parse(argv):
    """As convert.py: a first pass finds the plugins, which then add their flags. `--help` works alone
    (it shows the default plugins' flags, or those of the --loader/--saver given, and lists the rest)."""
    known, _ = base_parser(add_help=False, required=False).parse_known_args(argv)
    parser = base_parser()
    loader = plugins.load_plugin("loader", known.loader)
    saver = plugins.load_plugin("saver", known.saver)
    loader.add_arguments(parser)
    saver.add_arguments(parser)
    args = parser.parse_args(argv)
    args.loader, args.saver = plugins.canonical(args.loader), plugins.canonical(args.saver)
    for role, plugin in (("loader", loader), ("saver", saver)):
        model_types = getattr(plugin, "MODEL_TYPES", None)
        if model_types is not None and args.model_type not in model_types:
            raise ConversionError(f"--model-type {args.model_type}: the {getattr(args, role)} {role} converts "
                                  f"{' and '.join(model_types)} models only")
    return args, loader, saver


def check_folders(load_dir, save_dir):
    """The source is never modified: refuse an output inside it, or around it (its tracker file)."""
    source, target = Path(load_dir).resolve(), Path(save_dir).resolve()
    if source == target or source in target.parents or target in source.parents:
        raise ConversionError(f"--save-dir {save_dir} overlaps --load-dir {load_dir}; the source is never written to")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, loader, saver = parse(argv)
        check_folders(args.load_dir, args.save_dir)
        status = orchestrator.run(args, loader, saver)
    except ConversionError as error:
        print(f"converter_core: error: {error}", file=sys.stderr, flush=True)
        status = orchestrator.EXIT_INPUT
    sys.exit(status)
