"""The supported-models report: api.supported() as a document to read or send, in Markdown (checked in
as docs/supported-models.md) and PDF, one section per model family. Both are built from the same rows,
so they always say the same thing; neither holds a date, so the checked-in file can be compared."""

import datetime
import re
from pathlib import Path

from converter_core import output
from converter_core.errors import ConversionError

TITLE = "Supported models"
DIRECTIONS = (("hf_to_megatron", "HF -> Megatron"), ("megatron_to_hf", "Megatron -> HF"))
FORMATS = (("torch", "per-rank Megatron-Core files"), ("torch_dist", "Megatron-Core distributed checkpoint"),
           ("legacy", "legacy Megatron-LM GPT"))
INTRO = ("Which Hugging Face model families converter_core converts, in which direction, and from and to "
         "which Megatron checkpoint formats: {formats}. Generated from the installed plugins by "
         "{command}; each family's section gives the command line for every "
         "supported conversion, and the reason for every unsupported one.")
OVERVIEW_HEADINGS = ("Family", "HF architectures", "HF -> Megatron", "Megatron -> HF", "Both ways")
DETAIL_HEADINGS = ("Direction", "Format", "Supported", "Command")
MD_NAME, PDF_NAME = "supported-models.md", "supported-models.pdf"


def _intro(code):
    formats = ", ".join(f"{code(name)} ({what})" for name, what in FORMATS)
    return INTRO.format(formats=formats, command=code("python -m converter_core report"))


def _formats(entry, direction):
    """The Megatron formats one direction converts (none when no plugin does that direction)."""
    way = entry[direction]
    return [cell["format"] for cell in (way["formats"] if way else ()) if cell["supported"]]


def _overview_row(entry):
    there, back = _formats(entry, "hf_to_megatron"), _formats(entry, "megatron_to_hf")
    both = [name for name in there if name in back]
    return [entry["family"], ", ".join(entry["architectures"])] + [", ".join(names) or "no" for names in (there, back, both)]


def _detail_rows(entry):
    """(direction, format, 'yes' or 'no: why', command or '') per direction and Megatron format; a
    direction no plugin converts is one row saying so."""
    rows = []
    for direction, label in DIRECTIONS:
        if entry[direction] is None:
            rows.append((label, "all", "no: no installed plugin converts this family this way", ""))
            continue
        for cell in entry[direction]["formats"]:
            status = "yes" if cell["supported"] else f"no: {cell['note']}" if cell["note"] else "no"
            rows.append((label, cell["format"], status, cell["command"] or ""))
    return rows


def _facts(entry, code):
    """(label, text) lines above a family's table: architectures, package, plugins, notes."""
    architectures = ", ".join(map(code, entry["architectures"]))
    if len(entry["architectures"]) > 1:
        architectures += f" (Megatron -> HF writes {code(entry['architectures'][0])})"
    plugins = ", ".join(f"{code(f'--{flag} ' + entry[direction]['plugin'])} ({label})"
                        for (direction, label), flag in zip(DIRECTIONS, ("loader", "saver")) if entry[direction])
    return [("HF architectures", architectures), ("Package", code(entry["package"] or "") or "unknown"),
            ("HF plugin", plugins or "none"), ("Notes", "; ".join(entry["notes"]) or "none")]


def markdown(matrix):
    """The report as Markdown: title, intro, overview table, then one `## family` section each."""
    def code(text):
        return f"`{text}`" if text else ""

    def row(cells):
        return "| " + " | ".join(" ".join(str(c).split()).replace("|", "\\|") for c in cells) + " |"

    lines = [f"# {TITLE}", "", _intro(code), "", row(OVERVIEW_HEADINGS), row(["---"] * len(OVERVIEW_HEADINGS))]
    lines += [row([f"[{code(cells[0])}](#{cells[0]})"] + cells[1:]) for cells in map(_overview_row, matrix)]
    for entry in matrix:
        lines += ["", f"## {entry['family']}", ""]
        lines += [f"- {label}: {' '.join(text.split())}" for label, text in _facts(entry, code)]
        lines += ["", row(DETAIL_HEADINGS), row(["---"] * len(DETAIL_HEADINGS))]
        lines += [row([direction, code(fmt), status, code(command)])
                  for direction, fmt, status, command in _detail_rows(entry)]
    return "\n".join(lines) + "\n"


def _latin1(text):
    """The PDF core fonts are latin-1 only: plugin notes are free text, so map what is not."""
    for wide, narrow in (("\u2192", "->"), ("\u2190", "<-"), ("\u2014", "-"), ("\u2013", "-"), ("\u2018", "'"),
                         ("\u2019", "'"), ("\u201c", '"'), ("\u201d", '"'), ("\u2026", "...")):
        text = text.replace(wide, narrow)
    return text.encode("latin-1", "replace").decode("latin-1")


# The PDF's layout, in mm on A4 portrait; a command wraps at spaces, never inside a flag.
MARGIN, PADDING, COMMAND_WIDTH, COMMAND_PT = 18, 1.2, 96, 7
OVERVIEW_WIDTHS, DETAIL_WIDTHS = (22, 41, 37, 37, 37), (26, 18, 34, COMMAND_WIDTH)  # 174 = A4 less margins


def _wrap_command(command):
    """Courier is monospace (0.6 em a character), so cut into lines that fit the column, keeping each
    flag on the same line as its value."""
    chars = int((COMMAND_WIDTH - 2 * PADDING - 1) / (COMMAND_PT * 0.6 * 25.4 / 72))
    lines = []
    for unit in re.findall(r"-\S+ [^-\s]\S*|\S+", command):
        if lines and len(lines[-1]) + 1 + len(unit) <= chars:
            lines[-1] += " " + unit
        else:
            lines.append(unit)
    return "\n".join(lines)


def write_pdf(matrix, path):
    """The report as a PDF (fpdf2, an optional dependency): the overview, then one page and one outline
    entry per family."""
    try:
        from fpdf import FPDF
        from fpdf.fonts import FontFace
    except ImportError:
        raise ConversionError("the PDF needs the report extra: pip install 'converter_core[report]' (fpdf2)") from None

    class Document(FPDF):
        def footer(self):
            self.set_y(-12)
            self.set_font("Helvetica", size=8)
            self.set_text_color(110)
            self.cell(0, 5, f"converter_core - {TITLE.lower()} - page {self.page_no()}", align="C")
            self.set_text_color(0)

    pdf = Document(format="A4")
    pdf.set_margins(MARGIN, MARGIN, MARGIN)
    pdf.set_auto_page_break(True, margin=18)
    pdf.set_title(TITLE)
    pdf.set_creator("python -m converter_core report")
    pdf.set_creation_date(datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc))
    heading = FontFace(emphasis="BOLD", fill_color=(225, 230, 240))
    bold, mono = FontFace(emphasis="BOLD"), FontFace(family="Courier", size_pt=COMMAND_PT)
    yes, no = FontFace(color=(0, 110, 40)), FontFace(color=(170, 30, 30))
    links = {entry["family"]: pdf.add_link() for entry in matrix}  # pointed at each family's page below

    def table(headings, rows, widths, style):
        """rows: lists of texts; style(column, text) gives a cell its FontFace (or None)."""
        pdf.set_font("Helvetica", size=9)
        with pdf.table(col_widths=widths, width=sum(widths), align="L", headings_style=heading,
                       line_height=4.6, padding=PADDING, text_align="LEFT") as grid:
            grid.row(headings)
            for cells in rows:
                row = grid.row()
                for column, text in enumerate(cells):
                    row.cell(_latin1(text), style=style(column, text), link=links.get(text) if column == 0 else None)

    pdf.add_page()
    for link in links.values():
        pdf.set_link(link)  # the table wants a page already; set_link below moves it to the family
    pdf.set_font("Helvetica", "B", 22)
    pdf.cell(0, 12, TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    pdf.set_font("Helvetica", size=10)
    pdf.multi_cell(0, 5, _latin1(_intro(str)), align="L", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(5)
    table(OVERVIEW_HEADINGS, [_overview_row(entry) for entry in matrix], OVERVIEW_WIDTHS,
          lambda column, text: bold if column == 0 else no if text == "no" else None)
    for entry in matrix:
        pdf.add_page()
        pdf.set_link(links[entry["family"]])
        pdf.start_section(_latin1(entry["family"]))
        pdf.set_font("Helvetica", "B", 16)
        pdf.cell(0, 10, _latin1(entry["family"]), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1)
        for label, text in _facts(entry, str):
            pdf.set_font("Helvetica", "B", 10)
            pdf.cell(34, 5.5, label)
            pdf.set_font("Helvetica", size=10)
            pdf.multi_cell(0, 5.5, _latin1(text), align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(4)
        rows = [[direction, fmt, status, _wrap_command(command)] for direction, fmt, status, command in _detail_rows(entry)]
        table(DETAIL_HEADINGS, rows, DETAIL_WIDTHS,
              lambda column, text: mono if column == 3 else (yes if text == "yes" else no) if column == 2 else None)
    with output.writing(path):
        pdf.output(str(path))


def write(matrix, output_dir):
    """Write supported-models.md, then supported-models.pdf, into output_dir; the Markdown first, so it
    is there even when the PDF cannot be made. Returns both paths."""
    folder = Path(output_dir)
    md_path, pdf_path = folder / MD_NAME, folder / PDF_NAME
    with output.writing(md_path):
        folder.mkdir(parents=True, exist_ok=True)
        md_path.write_text(markdown(matrix))
    try:
        write_pdf(matrix, pdf_path)
    except ConversionError as error:
        raise ConversionError(f"wrote {md_path} but not the PDF: {error}") from None
    return md_path, pdf_path
