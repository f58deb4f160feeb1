"""``report.html``: the report in one self-contained file a browser opens: the same tables, plots and
anomaly-map grids as ``report.md`` (rendered from it, so the two cannot disagree), every image
embedded as a data URI, tables sortable by clicking a column's header, and nothing fetched from
anywhere (its Content-Security-Policy allows no request at all).

The Markdown read here is the subset ``report.py`` writes: headings, paragraphs, ``>`` quotes,
``-`` lists, pipe tables, images, ``**bold**`` and ``code``. A quote that says the numbers are not
meaningful (random weights) becomes a banner at the top.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; cursor: pointer; user-select: none; white-space: nowrap; }
th[aria-sort=ascending]::after { content: " ▲"; } th[aria-sort=descending]::after { content: " ▼"; }
tfoot td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; border: 1px solid #eee; }
code { background: #f4f4f4; padding: 0 3px; word-break: break-all; }
blockquote { margin: 1em 0; padding: 0.6em 1em; border-left: 4px solid #999; background: #f7f7f7; }
.banner { border-left-color: #b22222; background: #fdecea; color: #8b1a1a; font-size: 1.05em; }
"""

# Click a header: sort the body's rows by that column, numerically when every cell starts with a
# number (``94.10 ± 1.20 [88.0, 99.0]`` sorts as 94.10), else as text; click again to reverse.
SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], rows = Array.from(body.rows);
    var descending = th.getAttribute("aria-sort") !== "descending";
    table.querySelectorAll("th").forEach(function (other) { other.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    var key = function (row) { return row.cells[column] ? row.cells[column].textContent.trim() : ""; };
    var number = function (text) { var m = text.match(/^[-+]?\\d+(\\.\\d+)?/); return m ? parseFloat(m[0]) : NaN; };
    var numeric = rows.every(function (row) { return !isNaN(number(key(row))); });
    rows.sort(function (a, b) {
      var x = key(a), y = key(b), order = numeric ? number(x) - number(y) : x.localeCompare(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"""


def report_html(markdown: str, image_dir: Path, banner_text: str | None = None) -> str:
    """The HTML page of ``markdown`` (a report.md), its images read from ``image_dir`` and embedded.
    A quote containing ``banner_text`` (the not-meaningful warning) is shown as the page's banner."""
    lines = markdown.splitlines()
    title = next((line[2:].strip() for line in lines if line.startswith("# ")), "RAML report")
    body, i = [], 0
    while i < len(lines):
        line = lines[i].rstrip()
        if not line:
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append(lines[i].rstrip())
                i += 1
            body.append(_table(block))
        elif line.startswith("> "):
            quote = []
            while i < len(lines) and lines[i].startswith(">"):
                quote.append(lines[i][1:].strip())
                i += 1
            text = " ".join(quote)
            is_banner = banner_text is not None and banner_text in text
            attributes = ' class="banner" id="random-weights-banner" role="alert"' if is_banner else ""
            body.append(f"<blockquote{attributes}>{_inline(text)}</blockquote>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:].strip())}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
            i += 1
        elif _IMAGE.match(line):
            match = _IMAGE.match(line)
            body.append(_image(match["alt"], image_dir / match["src"]))
            i += 1
        else:
            paragraph = []
            while i < len(lines) and lines[i].strip() and not lines[i].startswith(("|", ">", "- ", "#", "![")):
                paragraph.append(lines[i].strip())
                i += 1
            body.append(f"<p>{_inline(' '.join(paragraph))}</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # nothing may be fetched: images are data URIs, the style and the script are inline
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + f"\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def _inline(text: str) -> str:
    """Escaped text with ``**bold**`` and ``code``."""
    text = html.escape(text, quote=False)
    text = _CODE.sub(r"<code>\1</code>", text)
    return _BOLD.sub(r"<strong>\1</strong>", text)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _table(block: list[str]) -> str:
    """A pipe table: its header, the body's rows (sortable), and from the first row whose first cell
    is bold (``**mean**``, then ``n (seeds)``) a footer that sorting leaves at the bottom."""
    header, rows = _cells(block[0]), [_cells(line) for line in block[2:]]
    split = next((i for i, row in enumerate(rows) if row[0].startswith("**")), len(rows))
    body, foot = rows[:split], rows[split:]

    def tr(cells, tag="td"):
        return "<tr>" + "".join(f"<{tag}>{_inline(cell)}</{tag}>" for cell in cells) + "</tr>"

    return (
        '<table class="sortable">'
        + f"<thead>{tr(header, 'th')}</thead>"
        + "<tbody>"
        + "".join(tr(row) for row in body)
        + "</tbody>"
        + ("<tfoot>" + "".join(tr(row) for row in foot) + "</tfoot>" if foot else "")
        + "</table>"
    )


def _image(alt: str, path: Path) -> str:
    """``<img>`` with the file's bytes as a data URI; a missing file is said, not linked."""
    mime = _MIME.get(path.suffix.lower())
    if mime is None or not path.is_file():
        return f"<p><em>(image {html.escape(path.name)} is missing)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'
