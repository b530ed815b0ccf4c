"""A small self-contained HTML report builder: headings, paragraphs, tables, inlined images.

Images are embedded as base64 PNG so a report is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowbit.io import atomic_write_text

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}
th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.5em 0}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:90%;color:#555}
"""


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


class HtmlReport:
    """Accumulates report sections and writes one HTML file atomically."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def link(self, text: str, href: str) -> None:
        """A paragraph holding one link (e.g. from an index page to a study page)."""
        self.parts.append(f'<p><a href="{html.escape(href)}">{html.escape(text)}</a></p>')

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
        """A table of dict rows; columns default to the keys of the first row."""
        if not rows:
            self.paragraph("(no rows)")
            return
        columns = list(columns or rows[0].keys())
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in columns) + "</tr>"
                       for r in rows)
        self.parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, png: str | Path | bytes, caption: str = "", width: int | None = None) -> None:
        """Inline a PNG (a path or raw bytes) with an optional caption; ``width`` scales it (pixelated)."""
        data = png if isinstance(png, bytes) else Path(png).read_bytes()
        encoded = base64.b64encode(data).decode("ascii")
        size = f' width="{int(width)}" style="image-rendering:pixelated"' if width else ""
        self.parts.append(f'<figure><img alt="{html.escape(caption)}"{size} '
                          f'src="data:image/png;base64,{encoded}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_STYLE}</style></head><body>{body}</body></html>")

    def save(self, path: str | Path) -> Path:
        atomic_write_text(path, self.render())
        return Path(path)
