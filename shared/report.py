"""report.html: one self-standing page per run (inline CSS, no script, no external resource).

The result table comes first, then the plots (PNG files beside the page, linked by
relative path so the folder opens as plain files), then any further tables, and the
resolved config last. Every text is HTML-escaped. The page and its plots folder are
written atomically: a reader sees the old version or the whole new one.
"""

from __future__ import annotations

import html
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence, Union

from shared.files import write_text_atomic

Rows = tuple[Sequence[str], Sequence[Sequence[object]]]
Table = Union[str, Rows]  # a markdown table (as tff_apps.reporting makes them) or (header, rows)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       max-width: 900px; margin: 1.5em auto; padding: 0 1em; color: #1a1a1a; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.3em; }
h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
ul.summary { padding-left: 1.2em; margin-top: 0.2em; color: #333; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; }
th { background: #f0f3f7; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e3e3; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
pre { background: #f6f8fa; border: 1px solid #ddd; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def markdown_table_rows(markdown: str) -> Rows:
    """(header, rows) of a pipe table: `| a | b |` lines, the `|---|` line skipped."""
    lines = [line.strip() for line in markdown.strip().splitlines() if line.strip().startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    cells = [row for row in cells if not all(set(c) <= set("-: ") and c for c in row)]
    if not cells:
        raise ValueError("not a markdown table: no '| ... |' line")
    return cells[0], cells[1:]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "n/a"
    return True


def table_html(table: Table) -> str:
    header, rows = markdown_table_rows(table) if isinstance(table, str) else table
    e = html.escape
    head = "<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in header) + "</tr>"
    body = []
    for row in rows:
        cells = []
        for index, value in enumerate(row):
            text = str(value)
            numeric = index > 0 and _is_number(text)
            cells.append(f'<td class="num">{e(text)}</td>' if numeric else f"<td>{e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>\n<thead>" + head + "</thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def section_html(section: Table) -> str:
    """A further section: its markdown tables as tables, `- ` lines as a list, other lines
    as paragraphs (a (header, rows) pair is one table)."""
    if not isinstance(section, str):
        return table_html(section)
    e = html.escape
    parts: list[str] = []
    blocks: list[tuple[str, list[str]]] = []  # runs of lines of one kind
    for line in (raw.strip() for raw in section.strip().splitlines()):
        kind = "table" if line.startswith("|") else "list" if line.startswith("- ") else "text" if line else ""
        if kind and blocks and blocks[-1][0] == kind and kind != "text":
            blocks[-1][1].append(line)
        elif kind:
            blocks.append((kind, [line]))
    for kind, lines in blocks:
        if kind == "table":
            parts.append(table_html("\n".join(lines)))
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{e(line[2:])}</li>" for line in lines) + "</ul>")
        else:
            parts.append(f"<p>{e(lines[0])}</p>")
    return "\n".join(parts)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yields a temporary folder beside `final`; on success it replaces `final` whole,
    on error it is removed and `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.{secrets.token_hex(6)}"
    temporary.mkdir()  # unlike mkdtemp, the mode follows the umask, as the final folder's should
    try:
        yield temporary
        if final.exists():
            old = final.parent / f".{final.name}.old.{secrets.token_hex(6)}"
            os.replace(final, old)
            os.replace(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_report_html(
    path: Path | str, title: str, summary_lines: Sequence[str], table: Table,
    images: Sequence[tuple[str, Path | str]], config_toml: str,
    extra_tables: Sequence[tuple[str, Table]] = (),
) -> Path:
    """Writes the page atomically and returns its path.

    `images` are (caption, PNG path); each must exist, and is linked relative to the page.
    """
    path = Path(path)
    e = html.escape
    figures = []
    for caption, image in images:
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"report image {image} does not exist")
        source = Path(os.path.relpath(image.resolve(), path.parent.resolve())).as_posix()
        figures.append(
            f'<figure><img src="{e(source)}" alt="{e(caption)}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style></head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
    ]
    if summary_lines:
        parts.append('<ul class="summary">' + "".join(f"<li>{e(line)}</li>" for line in summary_lines) + "</ul>")
    parts += ['<h2 id="results">Results</h2>', table_html(table)]
    if figures:
        parts += ['<h2 id="plots">Plots</h2>', *figures]
    for heading, extra in extra_tables:
        parts += [f"<h2>{e(heading)}</h2>", section_html(extra)]
    parts += ['<h2 id="config">Resolved config</h2>', f"<pre>{e(config_toml)}</pre>", "</body>", "</html>"]
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path
