"""convert.py's command line: parsed twice, so the chosen loader and saver can add their own flags."""

import argparse
import sys
from pathlib import Path

from converter_core import flags, orchestrator, plugins
from converter_core.errors import ConversionError


def base_parser(add_help=True):
    parser = argparse.ArgumentParser(prog="converter_core", description="Megatron Checkpoint Converter Arguments",
                                     allow_abbrev=False, conflict_handler="resolve", add_help=add_help)
    parser.add_argument("--model-type", type=str, required=True, choices=["GPT", "BERT"],
                        help="model family (only GPT is supported by the built-in plugins)")
    parser.add_argument("--loader", type=str, default="megatron", help="loader plugin name (default megatron)")
    parser.add_argument("--saver", type=str, default="megatron", help="saver plugin name (default megatron)")
    parser.add_argument("--load-dir", type=str, required=True, help="source checkpoint folder")
    parser.add_argument("--save-dir", type=str, required=True, help="output folder")
    parser.add_argument("--max-queue-size", type=flags.positive_int, default=2,
                        help="messages (one per layer) in flight between loader and saver; convert.py's default "
                             "is 50, ours 2 so memory stays at a few layers however many the model has")
    parser.add_argument("--no-checking", action="store_false", dest="checking",
                        help="do not check message order and leftover keys")
    return parser


def parse(argv):
    known, _ = base_parser(add_help=False).parse_known_args(argv)
    parser = base_parser()
    loader = plugins.load_plugin("loader", known.loader)
    saver = plugins.load_plugin("saver", known.saver)
    loader.add_arguments(parser)
    saver.add_arguments(parser)
    args = parser.parse_args(argv)
    args.loader, args.saver = plugins.canonical(args.loader), plugins.canonical(args.saver)
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
    except ConversionError as error:
        print(f"converter_core: error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(orchestrator.run(args, loader, saver))
