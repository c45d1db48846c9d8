"""The self-contained HTML page.

An :class:`HtmlReport` collects sections (facts, tables, plotly figures, notes) and writes a single
HTML file that opens offline: plotly.js is embedded once, inline, with the first figure, and every
later figure reuses it.

Example:
    >>> rep = HtmlReport("Residual stream of smollm2-135m")
    >>> rep.facts("Model", model.arch.to_dict())
    >>> rep.figure("Per-layer summary", trace.plot())
    >>> rep.table("Per-layer summary", trace.to_dataframe())
    >>> rep.write("out/report.html")

Figures come from :mod:`streamlens.present.figures`; numbers use the one format of
:func:`streamlens.present.results.fmt`.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from streamlens.present.results import fmt

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1300px;color:#222}
h1{font-size:1.6em;margin-bottom:4px} h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.ok{color:#0a7a2a;font-weight:600} .bad{color:#b00020;font-weight:600} .note{color:#555;font-size:13px}
.facts td{text-align:left}
"""


class HtmlReport:
    """A single-page HTML report built section by section; :meth:`write` makes it self-contained."""

    def __init__(self, title: str, *, subtitle: str = ""):
        self.title = title
        self.subtitle = subtitle
        self._parts: list[str] = []
        self._n_figures = 0
        self.sections: list[str] = []

    def section(self, title: str) -> None:
        """Start a new section with a heading."""
        self._h2(title)

    def _h2(self, title: str) -> None:
        self.sections.append(title)
        self._parts.append(f"<h2>{html.escape(title)}</h2>")

    def facts(self, title: str, facts: Mapping[str, Any]) -> None:
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in facts.items())
        self._h2(title)
        self._parts.append(f'<table class="facts">{rows}</table>')

    def check(self, label: str, value: float, tol: float, *, what: str = "") -> None:
        """An exactness check shown as passed/failed: ``value <= tol``."""
        ok = value <= tol
        cls, verdict = ("ok", "passed") if ok else ("bad", "FAILED")
        self._parts.append(
            f'<p><span class="{cls}">{html.escape(label)}: {verdict}</span> &mdash; {value:.2e} (tolerance {tol:.0e})'
            f'{" &mdash; " + html.escape(what) if what else ""}</p>'
        )

    def note(self, text: str) -> None:
        self._parts.append(f'<p class="note">{html.escape(text)}</p>')

    def table(self, title: str | None, df: pd.DataFrame, *, max_rows: int = 60) -> None:
        if title:
            self._h2(title)
        shown = df.head(max_rows)
        table = shown.to_html(index=False, float_format=fmt, border=0)
        self._parts.append(f'<div style="overflow-x:auto">{table}</div>')
        if len(df) > max_rows:
            self.note(f"first {max_rows} of {len(df)} rows; the full table is in the CSV files next to this report")

    def figure(self, title: str | None, fig) -> None:
        """Add a plotly figure; plotly.js is embedded inline with the first one only."""
        import plotly.io as pio

        if title:
            self._h2(title)
        first = self._n_figures == 0
        self._parts.append(pio.to_html(fig, full_html=False, include_plotlyjs="inline" if first else False,
                                       config={"displaylogo": False}))
        self._n_figures += 1

    def missing(self, title: str, reason: str) -> None:
        """A section that could not be computed, said plainly (never a placeholder number)."""
        self._h2(title)
        self._parts.append(f'<p class="bad">not computed: {html.escape(reason)}</p>')

    def to_html(self) -> str:
        sub = f'<p class="note">{html.escape(self.subtitle)}</p>' if self.subtitle else ""
        return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>{sub}"
                + "\n".join(self._parts) + "</body></html>")

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_html(), encoding="utf-8")
        return path
