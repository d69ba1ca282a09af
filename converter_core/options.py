"""convert.py's options, parsed twice so the chosen loader and saver can add their own flags; the same
parse serves the command line (argv) and the Python API (keyword arguments), so both validate alike."""

import argparse
import dataclasses
import os
import stat
import sys
import types
from pathlib import Path

from converter_core import flags, plugins, workers
from converter_core.errors import EXIT_USAGE, ConversionError


class UsageError(ConversionError):
    """argparse's complaint about the options (exit status 2 on the command line, as argparse)."""

    def __init__(self, message, usage):
        super().__init__(message, role="arguments", status=EXIT_USAGE)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message, self.format_usage())


def base_parser(add_help=True, required=True):
    parser = _Parser(prog="converter_core", description="Megatron Checkpoint Converter Arguments",
                     allow_abbrev=False, conflict_handler="resolve", add_help=add_help,
                     epilog=plugins.installed_summary())
    parser.add_argument("--model-type", type=str, required=required, choices=["GPT", "BERT"],
                        help="model family (the built-in plugins convert GPT models only)")
    parser.add_argument("--loader", type=str, default="megatron", help="loader plugin name (default megatron)")
    parser.add_argument("--saver", type=str, default="megatron", help="saver plugin name (default megatron)")
    parser.add_argument("--load-dir", type=str, required=required, help="source checkpoint folder, or a Hugging Face Hub id (org/name or org/name@revision)")
    parser.add_argument("--save-dir", type=str, required=required, help="output folder")
    parser.add_argument("--workers", type=flags.positive_int, default=workers.default_count(),
                        help="threads each of our savers writes with (default: the CPUs, at most "
                             f"{workers.MAX_DEFAULT_WORKERS}); 1 writes inline. The output is the same either way")
    parser.add_argument("--processes", type=flags.positive_int, default=1,
                        help="ranks this machine splits the conversion over, each a loader and saver pair writing "
                             "its own output files (docs/scale-out.md). Default 1: one pair already moves about "
                             "1 GB/s on one or two cores; more pay where cores and disk bandwidth are free. Under "
                             "torchrun leave it out: torchrun starts the ranks")
    parser.add_argument("--max-queue-size", type=flags.queue_size, default=2,
                        help="messages (one per layer) in flight between loader and saver, 0 for no limit; "
                             "convert.py's default is 50, ours 2 so memory stays at a few layers")
    parser.add_argument("--no-checking", action="store_false", dest="checking",
                        help="do not check message order and leftover keys")
    parser.add_argument("--stall-timeout", type=flags.seconds, default=600,
                        help="seconds the loader or saver waits on the other before the run is called stalled "
                             "and stopped (default 600; 0 waits forever)")
    parser.add_argument("--progress", choices=["auto", "json"], default="auto",
                        help="auto: a progress bar on a terminal, notes and a summary; json: one JSON event per line")
    parser.add_argument("--quiet", action="store_true", help="print nothing but an error")
    parser.add_argument("--dry-run", action="store_true",
                        help="read headers and metadata only, make every check, print the plan (files and sizes, "
                             "bytes to read and write, estimated time) and write nothing")
    return parser


def parse(argv, options=None):
    """(args, loader module, saver module). As convert.py: a first pass finds the plugins, which then add
    their flags. `--help` works alone (the default plugins' flags, or those of the --loader/--saver
    given, and the list of the rest). `options` ({dest: value}, the API's keyword arguments) become
    the flags they stand for, so they pass exactly the command line's checks."""
    known, _ = base_parser(add_help=False, required=False).parse_known_args(argv)
    parser = base_parser()
    try:
        loader = plugins.load_plugin("loader", known.loader)
        saver = plugins.load_plugin("saver", known.saver)
    except ConversionError as error:
        error.role = "arguments"
        raise
    loader.add_arguments(parser)
    saver.add_arguments(parser)
    args = parser.parse_args(list(argv) + _as_flags(parser, options or {}))
    args.loader, args.saver = plugins.canonical(args.loader), plugins.canonical(args.saver)
    args.save_dir = absolute_folder(args.save_dir)
    for role, plugin in (("loader", loader), ("saver", saver)):
        model_types = getattr(plugin, "MODEL_TYPES", None)
        if model_types is not None and args.model_type not in model_types:
            raise ConversionError(f"--model-type {args.model_type}: the {getattr(args, role)} {role} converts "
                                  f"{' and '.join(model_types)} models only", role="arguments")
    return args, loader, saver


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a conversion, as a Python keyword of converter_core.convert()."""
    name: str            # the keyword: target_tensor_parallel_size
    flag: str            # the command line's flag: --target-tensor-parallel-size
    type: type           # int, float, str or bool
    default: object      # the value when not given (None: the plugin decides, e.g. from the source)
    help: str            # the command line's help text
    plugin: str          # who declares it: "converter_core", or the loader's or saver's name
    role: str            # "core", "loader" or "saver"
    choices: tuple = None  # the values it takes, where it is one of a few


# Base flags that are convert()'s own parameters or the command line's display, not conversion options.
NOT_OPTIONS = {"model_type", "loader", "saver", "load_dir", "save_dir", "progress", "quiet", "dry_run"}
# What the shared argparse types take, as a Python type (byte_size also takes "5GB").
_TYPES = {flags.positive_int: int, flags.queue_size: int, flags.seconds: float, flags.byte_size: str}


def option_list(loader, saver):
    """Every Option the `loader` and `saver` plugins' pair takes, in the command line's order: the core
    ones, the loader's, the saver's. A flag both plugins declare is the saver's (argparse resolves it so).
    A side given as None is left out (a reference of one plugin's options)."""
    parser, declared = _pair_parser(loader, saver)
    return [Option(action.dest, action.option_strings[0], _python_type(action), action.default,
                   " ".join((action.help or "").split()), *declared[action],
                   tuple(action.choices) if action.choices else None)
            for action in _flag_actions(parser) if action.dest not in NOT_OPTIONS and action.help != argparse.SUPPRESS]


def _pair_parser(loader, saver):
    """(the pair's parser, {action: (plugin, role) that declared it})."""
    parser, declared = base_parser(required=False), {}
    for role, name in (("core", "converter_core"), ("loader", loader), ("saver", saver)):
        if name is None:
            continue
        if role != "core":
            try:
                plugins.load_plugin(role, name).add_arguments(parser)
            except ConversionError as error:
                error.role = "arguments"
                raise
            name = plugins.canonical(name)
        for action in _flag_actions(parser):
            declared.setdefault(action, (name, role))
    return parser, declared


def _flag_actions(parser):
    return [action for action in parser._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)]


def _python_type(action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return bool
    if action.type in _TYPES:
        return _TYPES[action.type]
    return action.type if isinstance(action.type, type) else str


def keywords(loader, saver):
    """{flag: the API keyword that stands for it} in the pair's messages: `--no-checking` is `checking=False`."""
    named = {}
    for action in _flag_actions(_pair_parser(loader, saver)[0]):
        for flag in action.option_strings:
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                named[flag] = f"{action.dest}={not action.default}"
            elif isinstance(action, argparse.BooleanOptionalAction):
                named[flag] = f"{action.dest}={not flag.startswith('--no-')}"
            else:
                named[flag] = action.dest
    return named


def _as_flags(parser, options):
    by_dest = {action.dest: action for action in parser._actions if action.option_strings}
    argv = []
    for name, value in options.items():
        action = by_dest.get(name)
        if action is None or isinstance(action, argparse._HelpAction):
            raise UsageError(f"unknown option {name!r} for these plugins", parser.format_usage())
        if _python_type(action) is bool:
            if value not in (True, False):
                raise UsageError(f"option {name!r} takes True or False, got {value!r}", parser.format_usage())
            if isinstance(action, argparse.BooleanOptionalAction):  # --x or --no-x
                argv += [action.option_strings[0 if value else 1]]
            else:
                argv += [action.option_strings[0]] if value != action.default else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return argv


def absolute_folder(path):
    """--save-dir as one absolute path, read as the kernel reads it: `.`, `..` and a trailing slash are
    gone, the folders above its last name have their links followed; the last name itself is kept (a
    link there is refused, not followed), so an existing empty folder however spelled is converted into."""
    if not path:
        raise ConversionError("--save-dir is empty; give a folder", role="arguments")
    path = Path(path)
    try:
        if path.name in ("", ".."):  # ".", "/", "..", "a/..": the folder it ends in
            return os.path.realpath(path)
        return os.path.join(os.path.realpath(path.parent), path.name)
    except ValueError as error:  # a NUL byte
        raise ConversionError(f"--save-dir {_shown(path)}: {error}", role="arguments") from None


def check_folders(load_dir, save_dir):
    """Before anything is written: both paths can be looked up (no link loop, no name too long), the
    output is a real folder or can be made one (nothing but folders above it), and the source is never
    modified: refuse an output inside it, or around it (its tracker file). A missing --load-dir is left
    to the loader, which says what it expected there."""
    _look_up("--load-dir", load_dir, os.stat)
    found = _look_up("--save-dir", save_dir, os.lstat)
    if found is not None and stat.S_ISLNK(found.st_mode):
        _refuse(save_dir, "is a symbolic link; choose a real --save-dir")
    if found is not None and not stat.S_ISDIR(found.st_mode):
        _refuse(save_dir, "exists and is not a folder")
    source, target = Path(os.path.realpath(load_dir)), Path(os.path.realpath(save_dir))
    if source == target or source in target.parents or target in source.parents:
        raise ConversionError(f"--save-dir {save_dir} overlaps --load-dir {load_dir}; the source is never written to",
                              role="arguments", path=save_dir)


def _look_up(flag, path, look):
    """`look(path)` (os.stat or os.lstat), None if nothing is there; any other failure is one line."""
    try:
        return look(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:  # a file where a folder should be
        above = next((p for p in reversed(Path(path).parents) if os.path.lexists(p) and not os.path.isdir(p)), path)
        _refuse(path, f"{_shown(above)} is not a folder", flag)
    except OSError as error:  # a link loop, a name too long, no permission
        _refuse(path, error.strerror, flag)
    except ValueError as error:  # a NUL byte
        _refuse(path, str(error), flag)


def _refuse(path, problem, flag="--save-dir"):
    raise ConversionError(f"{flag} {_shown(path)}: {problem}", role="arguments", path=path)


def _shown(path):
    """A path for a message: whole, or its ends and its length when it is too long to read."""
    text = str(path)
    return text if len(text) <= 160 else f"{text[:100]}...{text[-20:]} ({len(text)} characters)"


class _Callable(types.ModuleType):
    """converter_core.options(loader, saver) is the API's call, and converter_core.options is also this
    module (Python binds a package's submodule to its name on import): the module answers the call."""

    def __call__(self, loader, saver):
        return option_list(loader, saver)


sys.modules[__name__].__class__ = _Callable
