"""report.html: self-standing, table first and config last, escaped, written atomically."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from shared import plots
from shared.report import atomic_folder, markdown_table_rows, table_html, write_report_html

HOSTILE = '<script>alert("x")</script> & <img src=x onerror=1>'
TABLE = """| method      | pooled AUC | Brier  |
|-------------|------------|--------|
| federated   | 0.9992     | 0.0176 |
| centralized | n/a        | 0.0141 |"""


class Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(page: str) -> list[tuple[str, dict]]:
    parser = Tags()
    parser.feed(page)
    return parser.tags


@pytest.fixture
def page(tmp_path: Path) -> Path:
    with atomic_folder(tmp_path / "plots") as folder:
        first = plots.metric_per_round(
            [{"round": r, "auc": 0.5 + r / 20} for r in range(1, 6)], "auc", {"centralized": 0.8},
            folder / "auc.png", "AUC",
        )
        second = plots.per_client_bars({"a": {"federated": 1.0}, "b": {"federated": 2.0}}, "MAE", folder / "bars.png")
    assert first and second
    return write_report_html(
        tmp_path / "report.html", "healthcare run r1", ["Data: toy", "Rounds: 5"], TABLE,
        [("AUC per round", tmp_path / "plots" / "auc.png"), ("MAE per client", tmp_path / "plots" / "bars.png")],
        '[job]\nseed = 0\nrounds = 5\n',
        extra_tables=[("Per site", (["site", "auc"], [["a", 1.0], ["b", "n/a"]]))],
    )


def test_every_image_exists_and_decodes_as_a_png_with_content(page: Path):
    sources = [attrs["src"] for tag, attrs in tags_of(page.read_text()) if tag == "img"]
    assert sources == ["plots/auc.png", "plots/bars.png"]
    for source in sources:
        pixels = matplotlib.image.imread(page.parent / source)
        assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 20


def test_table_first_then_plots_then_config_last_and_nothing_external(page: Path):
    text = page.read_text()
    table, image, config = text.index("<table>"), text.index("<img"), text.index("<pre>")
    assert table < image < config
    assert text.rindex("<table>") < config and text.rstrip().endswith("</pre>\n</body>\n</html>")
    assert "[job]\nseed = 0\nrounds = 5" in text[config:]
    assert "<td>federated</td>" in text and '<td class="num">0.9992</td>' in text
    assert '<td class="num">n/a</td>' in text and "-----" not in text
    assert not re.search(r"<script|<link|https?://|@import", text)
    alts = [attrs["alt"] for tag, attrs in tags_of(text) if tag == "img"]
    assert alts == ["AUC per round", "MAE per client"]


def test_every_text_is_escaped(tmp_path: Path):
    image = plots.per_client_bars({"a": {"m": 1.0}}, "v", tmp_path / "p.png")
    path = write_report_html(
        tmp_path / "r.html", HOSTILE, [HOSTILE], f"| method | v |\n|---|---|\n| {HOSTILE.replace('|', '')} | 1 |",
        [(HOSTILE, image)], f"note = '{HOSTILE}'", extra_tables=[(HOSTILE, ([HOSTILE], [[HOSTILE]]))],
    )
    text = path.read_text()
    assert "<script" not in text and "onerror=1>" not in text
    assert text.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;") >= 6
    assert [tag for tag, _ in tags_of(text)].count("img") == 1


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path, page: Path):
    write_report_html(page, "again", [], TABLE, [], "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "report.html"]
    assert "again" in page.read_text()


def test_a_failed_plots_folder_keeps_the_old_one_and_leaves_nothing(tmp_path: Path):
    with atomic_folder(tmp_path / "plots") as folder:
        (folder / "old.png").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "plots") as folder:
            (folder / "new.png").write_bytes(b"new")
            raise RuntimeError("drawing failed")
    assert [p.name for p in tmp_path.iterdir()] == ["plots"]
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["old.png"]
    with atomic_folder(tmp_path / "plots") as folder:
        (folder / "new.png").write_bytes(b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["plots"]
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["new.png"]


def test_a_missing_image_is_refused_before_anything_is_written(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report_html(tmp_path / "r.html", "t", [], TABLE, [("gone", tmp_path / "missing.png")], "")
    assert list(tmp_path.iterdir()) == []


def test_markdown_table_rows_and_rows_given_directly_agree():
    header, rows = markdown_table_rows(TABLE)
    assert header == ["method", "pooled AUC", "Brier"]
    assert rows == [["federated", "0.9992", "0.0176"], ["centralized", "n/a", "0.0141"]]
    assert table_html(TABLE) == table_html((header, rows))
    with pytest.raises(ValueError, match="markdown table"):
        markdown_table_rows("no table here")
