"""The package as a user gets it. `python -m build` makes the sdist and, from it, the wheel (so both are
complete) out of a copy of the repository; the wheel holds every package and entry point setup.cfg
declares; installed alone (--no-deps) into a fresh venv that sees the system's torch and transformers,
it is the converter_core that venv imports, and it converts a Llama to Megatron-Core and back, bit for
bit, run from a folder outside the repository. The build uses the installed setuptools
(--no-isolation): no network, seconds instead of a download."""

import configparser
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, assert_bit_identical, make_hf_model

# Where setup.cfg's package_dir puts each top-level package's source.
SOURCES = {"converter_core": REPO / "converter_core", "converter_plugins": REPO / "plugins" / "converter_plugins"}
BUILD_LEFTOVERS = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
                                         "example-output")


def run(command, **kwargs):
    process = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=180, **kwargs)
    assert process.returncode == 0, f"{command} failed:\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    return process


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """(wheel, sdist) built from a copy of the repository, so the build leaves nothing in the checkout."""
    root = tmp_path_factory.mktemp("package")
    shutil.copytree(REPO, root / "source", ignore=BUILD_LEFTOVERS)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", root / "dist", root / "source"])
    (wheel,), (sdist,) = (sorted((root / "dist").glob(pattern)) for pattern in ("*.whl", "*.tar.gz"))
    return wheel, sdist


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory):
    """The python of a fresh venv (system site-packages visible) with only the wheel installed into it, and a
    working folder outside the repository. PYTHONPATH is dropped, so the checkout cannot be imported."""
    root = tmp_path_factory.mktemp("installed")
    venv.create(root / "venv", system_site_packages=True)  # with_pip=False: the system's pip installs into it
    python = root / "venv" / "bin" / "python"
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    if sys.prefix != sys.base_prefix:  # the tests run in a venv: the "system" torch and transformers are in it
        own = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=env).stdout.strip()
        lines = [f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages()]
        Path(own, "tests_runner_site.pth").write_text("".join(lines))  # after the venv's own site-packages
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", dist[0]], env=env, cwd=root)
    (root / "work").mkdir()
    return python, root / "work", env


def modules_in(top, folder):
    """Dotted names of every module under a package folder, as the wheel must hold them."""
    return {".".join((top, *path.relative_to(folder).with_suffix("").parts)) for path in folder.rglob("*.py")}


def test_the_wheel_holds_every_module_and_entry_point(dist):
    with zipfile.ZipFile(dist[0]) as wheel:
        names = wheel.namelist()
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/entry_points.txt"))
        entry_points = configparser.ConfigParser(interpolation=None)
        entry_points.optionxform = str
        entry_points.read_string(wheel.read(f"{info}/entry_points.txt").decode())
        metadata = wheel.read(f"{info}/METADATA").decode()
    shipped = {name[:-3].replace("/", ".") for name in names if name.endswith(".py")}
    assert shipped == set().union(*(modules_in(top, folder) for top, folder in SOURCES.items()))
    assert {"converter_core.hf_family", "converter_core.megatron", "converter_core.formats"} <= {
        name.rsplit(".", 1)[0] for name in shipped}

    setup = configparser.ConfigParser(interpolation=None)
    setup.read(REPO / "setup.cfg")
    declared = {group: dict(tuple(part.strip() for part in line.split("=", 1)) for line in lines.splitlines() if line.strip())
                for group, lines in setup["options.entry_points"].items()}
    assert {group: dict(entry_points[group]) for group in entry_points.sections()} == declared
    assert {"converter_core.loaders", "converter_core.savers", "converter_core.aliases"} <= set(declared)
    extras = {line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Provides-Extra:")}
    assert extras == set(setup["options.extras_require"]) >= {"test", "report", "hub"}


def test_the_sdist_carries_the_tests_and_their_fixtures(dist):
    """The sdist the wheel was built from also holds what a user needs to run the tests from it."""
    with tarfile.open(dist[1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    fixtures = {str(path.relative_to(REPO)) for path in (REPO / "tests" / "fixtures").rglob("*") if path.is_file()}
    assert fixtures and fixtures <= names
    assert {"tests/helpers.py", "pyproject.toml", "setup.cfg", "README.md", "plugins/converter-phi3/setup.cfg"} <= names


def test_the_installed_wheel_is_what_runs(installed):
    python, work, env = installed
    where = run([python, "-c", "import json, converter_core, converter_plugins;"
                 "print(json.dumps([converter_core.__file__, converter_plugins.__file__]))"], env=env, cwd=work)
    venv_folder = python.parent.parent.resolve()
    for module in json.loads(where.stdout):
        assert venv_folder in Path(module).resolve().parents, f"{module} is not the venv's install"
    listed = run([python.parent / "converter-core", "--list-plugins"], env=env, cwd=work).stdout
    assert "llama_hf" in listed and "mcore" in listed


def test_the_installed_wheel_converts_to_megatron_and_back(installed):
    python, work, env = installed
    make_hf_model(work / "hf", "llama")
    common = ["--model-type", "GPT", "--quiet"]
    run([python, "-m", "converter_core", *common, "--loader", "llama_hf", "--saver", "mcore", "--load-dir", "hf",
         "--save-dir", "mcore", "--target-tensor-parallel-size", "2"], env=env, cwd=work)
    assert sorted(path.name for path in (work / "mcore").glob("iter_*/mp_rank_*")) == ["mp_rank_00", "mp_rank_01"]
    run([python.parent / "converter-core", *common, "--loader", "mcore", "--saver", "llama_hf", "--load-dir", "mcore",
         "--save-dir", "back"], env=env, cwd=work)
    assert_bit_identical(work / "hf", work / "back")
