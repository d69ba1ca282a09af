"""Plugin discovery: stevedore entry points first (groups converter_core.loaders / converter_core.savers),
then convert.py's rule: a module `loader_<name>` / `saver_<name>`, else `<name>`, on sys.path."""

import importlib
import importlib.metadata

from stevedore import driver
from stevedore.exception import NoMatches

from converter_core.errors import ConversionError, first_line

def aliases():
    """{other name: plugin name}: convert.py's plugin names that ours replace, declared by the packages that
    install them (entry point group converter_core.aliases)."""
    return {entry.name: entry.value for entry in importlib.metadata.entry_points(group="converter_core.aliases")}


def canonical(name):
    return aliases().get(name, name)


def load_plugin(kind, name):
    """The plugin module for kind 'loader' or 'saver'."""
    name = canonical(name)
    module = _from_entry_point(kind, name) or _from_sys_path(kind, name)
    if module is None:
        raise ConversionError(f"Unable to load {kind} plugin {name}: no entry point in converter_core.{kind}s "
                              f"and no module {kind}_{name} or {name} on sys.path")
    if not hasattr(module, "add_arguments"):
        raise ConversionError(f"{module.__name__} module is not a plugin (no add_arguments)")
    entry = "load_checkpoint" if kind == "loader" else "save_checkpoint"
    if not hasattr(module, entry):
        raise ConversionError(f"{module.__name__} module is not a {kind} plugin (no {entry})")
    return module


def installed(kind):
    """Names of the installed `kind` ('loader' or 'saver') plugins, from the entry points."""
    return sorted({entry.name for entry in importlib.metadata.entry_points(group=f"converter_core.{kind}s")})


def distribution(module):
    """The installed distribution (pip package) whose entry point names `module`, or None."""
    for kind in ("loader", "saver"):
        for entry in importlib.metadata.entry_points(group=f"converter_core.{kind}s"):
            if entry.module == module.__name__:
                return entry.dist.name if entry.dist else None
    return None


def installed_summary():
    known = ", ".join(f"{alias}={name}" for alias, name in sorted(aliases().items()))
    return (f"Installed loaders: {', '.join(installed('loader'))}. Installed savers: {', '.join(installed('saver'))}. "
            f"Aliases: {known}. A module loader_<name> / saver_<name> or <name> on sys.path is a plugin too.")


def _from_entry_point(kind, name):
    if name not in installed(kind):
        return None  # asking stevedore for a name it lacks makes some of its versions log a warning
    try:
        return driver.DriverManager(namespace=f"converter_core.{kind}s", name=name, invoke_on_load=False).driver
    except NoMatches:
        return None
    except Exception as error:
        raise ConversionError(f"{kind} plugin {name} failed to import: {first_line(error)}"
                              + (" (raise `ulimit -v`, or free memory)" if isinstance(error, MemoryError) else "")) from None


def _from_sys_path(kind, name):
    for module_name in (f"{kind}_{name}", name):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise ConversionError(f"{kind} plugin {module_name} failed to import: {error}") from None
    return None
