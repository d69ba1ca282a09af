"""The supported-models report: `python -m converter_core report` writes the Markdown and the PDF of
api.supported(), one section (and one PDF outline entry) per family, and says so when fpdf2 is missing."""

import os
import re
import subprocess
import sys

import pypdf
import pytest

from converter_core import api, report

COMMAND = [sys.executable, "-m", "converter_core", "report"]


def run_report(output_dir, env=None):
    return subprocess.run([*COMMAND, "--output-dir", str(output_dir)], capture_output=True, text=True, timeout=120,
                          env=env)


def outline(pdf_path):
    """The PDF outline's titles, top level only; nested entries (lists in pypdf) are returned as lists."""
    return [item if isinstance(item, list) else item.title for item in pypdf.PdfReader(pdf_path).outline]


def pdf_text(pdf_path):
    """The whole document's text, runs of whitespace (line breaks in wrapped cells) as one space."""
    return " ".join(" ".join(page.extract_text() for page in pypdf.PdfReader(pdf_path).pages).split())


def loader_saver(command):
    return re.search(r"--loader \S+ --saver \S+", command).group()


@pytest.fixture(scope="module")
def matrix():
    return api.supported()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One run of the command into a folder it has to create."""
    folder = tmp_path_factory.mktemp("report") / "new" / "out"
    process = run_report(folder)
    assert process.returncode == 0, process.stderr
    return process, folder


def test_report_writes_the_markdown_and_the_pdf(generated, matrix):
    process, folder = generated
    md, pdf = folder / "supported-models.md", folder / "supported-models.pdf"
    assert process.stdout.splitlines() == [f"wrote {md}", f"wrote {pdf}"] and process.stderr == ""
    assert md.read_text() == report.markdown(matrix)
    assert pdf.read_bytes().startswith(b"%PDF")
    families = [entry["family"] for entry in matrix]
    assert outline(pdf) == families
    text = pdf_text(pdf)
    commands = [cell["command"] for entry in matrix for direction in ("hf_to_megatron", "megatron_to_hf")
                if entry[direction] for cell in entry[direction]["formats"] if cell["supported"]]
    assert commands
    for needed in families + [loader_saver(command) for command in commands]:
        assert needed in text


def test_the_example_plugin_package_is_in_the_report(generated, matrix):
    """plugins/ ships a third-party example package registering `phi3`; it is installed for the tests."""
    assert "phi3" in [entry["family"] for entry in matrix]
    assert "phi3" in outline(generated[1] / "supported-models.pdf")


def test_every_family_says_what_it_does_with_fp8_and_mtp_layers(matrix):
    """What the generic HF loader and saver do is said for every family they run, the example plugin's too,
    not only for the built-in ones; whether MTP layers convert follows the family's table."""
    families = api.installed_families()
    for entry in matrix:
        notes = " ".join(entry["notes"])
        assert "FP8 block-scaled weights" in notes, entry["family"]
        has_mtp = families[entry["family"]].mtp is not None
        assert ("multi-token-prediction layers" in notes) and ("convert both ways" in notes) == has_mtp, entry["family"]
    assert any(families[entry["family"]].mtp for entry in matrix) and not families["phi3"].mtp


def test_without_fpdf2_the_markdown_is_still_written(tmp_path, matrix):
    fake = tmp_path / "no-fpdf" / "fpdf"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named fpdf")\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    process = run_report(tmp_path / "out", env=env)
    assert process.returncode != 0
    lines = process.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("converter_core: error: ") and "converter_core[report]" in lines[0]
    assert (tmp_path / "out" / "supported-models.md").read_text() == report.markdown(matrix)
    assert not (tmp_path / "out" / "supported-models.pdf").exists()


def test_bad_usage_is_one_line_and_status_2(tmp_path):
    process = subprocess.run([*COMMAND, "--output", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.splitlines() == ["converter_core: error: report takes only --output-dir DIR"]


def way(plugin, hf_to_megatron, unsupported=()):
    """One direction of a hand-made matrix entry: torch and torch_dist through mcore, legacy through megatron."""
    cells = []
    for fmt, saver in (("torch", "mcore"), ("torch_dist", "mcore"), ("legacy", "megatron")):
        if fmt in unsupported:
            cells.append({"format": fmt, "supported": False, "note": "qk_layernorm (legacy has none)", "command": None})
        elif hf_to_megatron:
            flags = " --ckpt-format torch_dist" if fmt == "torch_dist" else ""
            cells.append({"format": fmt, "supported": True, "note": "", "command":
                          f"python -m converter_core --loader {plugin} --saver {saver}{flags} --load-dir HF_DIR --save-dir MEGATRON_DIR"})
        else:
            cells.append({"format": fmt, "supported": True, "note": "", "command":
                          f"python -m converter_core --loader {saver} --saver {plugin} --load-dir MEGATRON_DIR --save-dir HF_DIR"})
    return {"plugin": plugin, "formats": cells}


HAND_MADE = [
    {"family": "gemma", "architectures": ["GemmaForCausalLM"], "package": "converter-gemma",
     "notes": ["one way for now \u2192 a saver is planned", "tied | embeddings"],
     "hf_to_megatron": way("gemma_hf", True), "megatron_to_hf": None},
    {"family": "llama", "architectures": ["LlamaForCausalLM"], "package": "converter_core", "notes": [],
     "hf_to_megatron": way("llama_hf", True), "megatron_to_hf": way("llama_hf", False)},
    {"family": "qwen3", "architectures": ["Qwen3ForCausalLM", "Qwen3Model"], "package": None, "notes": [],
     "hf_to_megatron": way("llama_hf", True, {"legacy"}), "megatron_to_hf": way("llama_hf", False, {"legacy"})},
]


def test_markdown_has_an_overview_and_one_section_per_family():
    text = report.markdown(HAND_MADE)
    assert text == report.markdown(HAND_MADE) and text.startswith("# Supported models\n")
    assert re.findall(r"^## (.*)$", text, re.M) == ["gemma", "llama", "qwen3"]
    assert "| [`gemma`](#gemma) | GemmaForCausalLM | torch, torch_dist, legacy | no | no |" in text
    assert "| [`qwen3`](#qwen3) | Qwen3ForCausalLM, Qwen3Model | torch, torch_dist | torch, torch_dist | torch, torch_dist |" in text
    assert "| Megatron -> HF | `all` | no: no installed plugin converts this family this way |  |" in text
    assert "| HF -> Megatron | `legacy` | no: qk_layernorm (legacy has none) |  |" in text
    assert ("| HF -> Megatron | `torch_dist` | yes | `python -m converter_core --loader llama_hf --saver mcore "
            "--ckpt-format torch_dist --load-dir HF_DIR --save-dir MEGATRON_DIR` |") in text
    assert "- Notes: one way for now \u2192 a saver is planned; tied | embeddings" in text
    assert "- Package: unknown" in text
    sections = text.split("\n## ")[1:]
    assert [section.count("\n| HF -> Megatron |") + section.count("\n| Megatron -> HF |") for section in sections] == [4, 6, 6]


def test_pdf_of_a_hand_made_matrix(tmp_path):
    path = tmp_path / "r.pdf"
    report.write_pdf(HAND_MADE, path)
    assert outline(path) == ["gemma", "llama", "qwen3"]
    assert len(pypdf.PdfReader(path).pages) == 4  # the overview, then a page per family
    text = pdf_text(path)
    assert "one way for now -> a saver is planned" in text  # core fonts are latin-1: the arrow is mapped
    assert "--loader mcore --saver llama_hf" in text and "no: qk_layernorm (legacy has none)" in text


def test_commands_wrap_to_the_column_between_flags():
    command = HAND_MADE[0]["hf_to_megatron"]["formats"][1]["command"]
    lines = report._wrap_command(command).splitlines()
    chars = int((report.COMMAND_WIDTH - 2 * report.PADDING - 1) / (report.COMMAND_PT * 0.6 * 25.4 / 72))
    assert " ".join(lines) == command and len(lines) > 1 and max(map(len, lines)) <= chars
    assert not any(line.endswith(("--ckpt-format", "--load-dir", "--save-dir")) for line in lines)
