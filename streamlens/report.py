"""Writers for reports: one self-contained HTML page, CSV tables and JSON summaries.

An :class:`HtmlReport` collects sections (facts, tables, plotly figures, notes) and writes a single
HTML file that opens offline: plotly.js is embedded once, inline, with the first figure, and every
later figure reuses it.

Example:
    >>> rep = HtmlReport("Residual stream of smollm2-135m")
    >>> rep.facts("Model", model.arch.to_dict())
    >>> rep.figure("Per-layer summary", trace.plot())
    >>> rep.table("Per-layer summary", trace.to_dataframe())
    >>> rep.write("out/report.html")

The figure builders here (:func:`layer_bars`, :func:`layer_position_heatmap`, :func:`interval_chart`)
are the report's own charts; plotly is imported inside them, never at import time.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1300px;color:#222}
h1{font-size:1.6em;margin-bottom:4px} h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td:first-child,th:first-child{text-align:left}
.ok{color:#0a7a2a;font-weight:600} .bad{color:#b00020;font-weight:600} .note{color:#555;font-size:13px}
.facts td{text-align:left}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors, numpy values, data frames and paths turned into plain JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, pd.DataFrame):
        return jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # torch tensors and numpy arrays/scalars
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=2))
    return path


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def text_table(df: pd.DataFrame, *, max_rows: int = 40) -> str:
    """A plain-text table for a terminal (long tables keep their first and last rows)."""
    if len(df) > max_rows:
        half = max_rows // 2
        gap = pd.DataFrame([{c: "..." for c in df.columns}])
        df = pd.concat([df.head(half).astype(object), gap, df.tail(half).astype(object)])
    return df.to_string(index=False, float_format=lambda v: f"{v:.4g}")


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
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in facts.items())
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
        table = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
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


# ---------------------------------------------------------------------------- figures
def layer_bars(df: pd.DataFrame, *, x: str, y: str, error: str | None = None, color: str | None = None,
               title: str = "", y_title: str | None = None):
    """Bars of ``y`` over ``x`` (one group per ``color`` value), with symmetric error bars from ``error``."""
    import plotly.graph_objects as go

    fig = go.Figure()
    groups = [(None, df)] if color is None else list(df.groupby(color, sort=False))
    for key, g in groups:
        err = dict(type="data", array=g[error].tolist(), visible=True) if error and error in g else None
        fig.add_trace(go.Bar(x=g[x].tolist(), y=g[y].tolist(), error_y=err, name=str(key) if key is not None else y))
    fig.update_layout(title=title, barmode="group", height=380, template="plotly_white",
                      xaxis_title=x, yaxis_title=y_title or y)
    return fig


def layer_position_heatmap(z, *, x_labels: Sequence[str], y_labels: Sequence[Any], title: str = "",
                           colorbar: str = "", diverging: bool = False):
    """A heatmap with layers down the side and token positions across."""
    import plotly.graph_objects as go

    xs = [f"{i}:{t}" for i, t in enumerate(x_labels)]  # positions stay distinct even when tokens repeat
    kw = dict(colorscale="RdBu", zmid=0) if diverging else dict(colorscale="Viridis")
    fig = go.Figure(go.Heatmap(z=z, x=xs, y=[str(y) for y in y_labels], colorbar=dict(title=colorbar), **kw))
    fig.update_layout(title=title, height=max(300, 18 * len(y_labels) + 120), template="plotly_white",
                      xaxis_title="position: token", yaxis_title="layer", yaxis=dict(autorange="reversed"))
    return fig


def interval_chart(df: pd.DataFrame, *, x: str, y: str, lo: str | None = None, hi: str | None = None,
                   color: str | None = None, title: str = "", y_title: str | None = None, log_y: bool = False):
    """Lines of ``y`` over ``x`` with asymmetric interval bars ``[lo, hi]``, one line per ``color`` value."""
    import plotly.graph_objects as go

    fig = go.Figure()
    groups = [(None, df)] if color is None else list(df.groupby(color, sort=False))
    for key, g in groups:
        err = None
        if lo and hi and lo in g and hi in g:
            err = dict(type="data", symmetric=False, array=(g[hi] - g[y]).tolist(),
                       arrayminus=(g[y] - g[lo]).tolist(), visible=True)
        fig.add_trace(go.Scatter(x=g[x].tolist(), y=g[y].tolist(), error_y=err, mode="lines+markers",
                                 name=str(key) if key is not None else y))
    fig.update_layout(title=title, height=400, template="plotly_white", xaxis_title=x, yaxis_title=y_title or y)
    if log_y:
        fig.update_yaxes(type="log")
    return fig


def mean_interval(df: pd.DataFrame, by: Sequence[str], value: str = "value", *, z: float = 1.96) -> pd.DataFrame:
    """Mean of ``value`` per group with a normal-approximation interval: columns mean, sem, lo, hi, n."""
    g = df.groupby(list(by), sort=True, dropna=False)[value]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["sem"] = (out["std"] / out["n"].clip(lower=1) ** 0.5).fillna(0.0)
    out["lo"], out["hi"] = out["mean"] - z * out["sem"], out["mean"] + z * out["sem"]
    return out.drop(columns="std")


# ---------------------------------------------------------------------------- attribution
def attribution_payload(dec, *, model: str, tokens: Sequence[str], prompt: int = 0, sel: int = 0,
                        target_index: int = 0) -> dict[str, Any]:
    """The JSON of one decomposed prediction (``streamlens attribute --format json``).

    ``components`` holds every writer except the bias; ``sum(c["value"]) + bias == logit`` up to float
    rounding (``check``, relative, is the decomposition's own).
    """
    df = dec.to_dataframe()
    df = df[(df["prompt"] == prompt) & (df["sel"] == sel) & (df["target_index"] == target_index)]
    bias = df[df["kind"] == "bias"]
    comps = df[df["kind"] != "bias"]
    na = lambda v: None if pd.isna(v) else int(v)  # noqa: E731
    tid = None if dec.target_ids is None else int(dec.target_ids[prompt, sel, target_index])
    cid = None if dec.contrast_ids is None else int(dec.contrast_ids[prompt, sel, target_index])
    return {
        "model": model,
        "tokens": list(tokens),
        "position": int(dec.positions[prompt, sel]),
        "target": dec.target_names.get(tid, tid) if tid is not None else dec.target_kind,
        "target_id": tid,
        "contrast": None if cid is None else dec.target_names.get(cid, cid),
        "contrast_id": cid,
        "unit": dec.unit,
        "logit": float(dec.model_values[prompt, sel, target_index]),
        "bias": float(bias["value"].sum()),
        "check": dec.check(),
        "components": [{"name": r.component, "kind": r.kind, "layer": na(r.layer), "head": na(r.head),
                        "neuron": na(r.neuron), "value": float(r.value)} for r in comps.itertuples()],
    }


def attribution_report(payload: Mapping[str, Any], path: str | Path, *, arch: Mapping[str, Any] | None = None) -> Path:
    """An HTML page for one attribution: facts, the exactness check, the bars and the component table."""
    rep = HtmlReport(f"Attribution: {payload['target']!r}" + (f" − {payload['contrast']!r}" if payload.get("contrast") else ""),
                     subtitle=f"model {payload['model']}; prompt tokens {''.join(payload['tokens'])!r}, position {payload['position']}")
    rep.facts("Model", dict(arch or {"model": payload["model"]}))
    rep.section("Exactness")
    total = sum(c["value"] for c in payload["components"]) + payload["bias"]
    rep.check("components + bias = the model's logit", abs(total - payload["logit"]) / max(abs(payload["logit"]), 1e-12),
              1e-4, what=f"logit {payload['logit']:.4f}, sum {total:.4f}, bias {payload['bias']:.4f}")
    comps = pd.DataFrame(payload["components"])
    rep.figure("Contributions", layer_bars(comps.assign(component=comps["name"]), x="component", y="value", color="kind",
                                           title="exact direct contribution of each writer", y_title="logit contribution"))
    rep.table("Components", pd.DataFrame(payload["components"]), max_rows=200)
    return rep.write(path)
