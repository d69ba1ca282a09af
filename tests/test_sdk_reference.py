"""docs/sdk-reference.md, the SDK's reference, is what scripts/sdk_reference_doc.py writes from
converter_core.plugin; it names every exported name; and every exported name is documented: a docstring,
or for a constant a comment where it is defined. KNOWN_MISSING lists the names without one today, and
must stay accurate (a name documented since is taken off it)."""

import importlib.util
from pathlib import Path

from converter_core import plugin

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "sdk-reference.md"

# Exported names without a docstring (functions, classes) or a comment at their definition (constants).
KNOWN_MISSING = set()


def load_script():
    spec = importlib.util.spec_from_file_location("sdk_reference_doc", REPO / "scripts" / "sdk_reference_doc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_committed_reference_is_generated():
    """Regenerate with `python scripts/sdk_reference_doc.py` after changing the SDK or its docstrings."""
    text = load_script().markdown()
    assert DOC.read_text() == text, "docs/sdk-reference.md is stale: run python scripts/sdk_reference_doc.py"
    assert " at 0x" not in text and str(REPO) not in text  # nothing that differs between runs or machines


def test_every_exported_name_has_an_entry_in_its_group():
    script = load_script()
    grouped = [name for _, names in script.groups() for name in names]
    assert sorted(grouped) == sorted(plugin.__all__)
    assert "Other" not in [heading for heading, _ in script.groups()]  # every name sits under a comment
    text = DOC.read_text()
    assert [name for name in plugin.__all__ if f"### `{name}`\n" not in text] == []


def test_every_exported_name_is_documented():
    script = load_script()
    missing = {name for name in plugin.__all__ if not script.description(name)}
    assert sorted(missing - KNOWN_MISSING) == [], "give these a docstring (a constant: a comment where it is defined)"
    assert sorted(KNOWN_MISSING - missing) == [], "documented now (or no longer exported): take off KNOWN_MISSING"


def test_check_exits_non_zero_on_a_stale_page(tmp_path, capsys, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "DOC", tmp_path / "sdk-reference.md")
    (tmp_path / "sdk-reference.md").write_text(script.markdown() + "edited by hand\n")
    assert script.main(["--check"]) == 1
    assert "python scripts/sdk_reference_doc.py" in capsys.readouterr().err
    assert script.main([]) == 0 and script.main(["--check"]) == 0
