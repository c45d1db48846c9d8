"""How attention reads look: patterns per head with token labels, the flow graph, per-source and path charts.

Plain plotly (imported inside each function) and plain HTML: the pattern view is the one researchers
know from CircuitsVis (a query × source grid per head, token labels on both axes), with no JavaScript
beyond plotly's own, so it renders in Jupyter and in the self-contained HTML report alike.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import torch

MAX_HTML_TOKENS = 48


def _labels(tokens: Sequence[str]) -> list[str]:
    return [f"{i}:{t!r}"[: 24] for i, t in enumerate(tokens)]


def pattern_figure(pattern: torch.Tensor, tokens: Sequence[str], *, title: str = "", head_names: Sequence[str] | None = None):
    """Heatmap of one head's pattern ``(query, source)``; for ``(head, query, source)`` a menu picks the head."""
    import plotly.graph_objects as go

    pat = pattern.float().cpu()
    if pat.dim() == 2:
        pat = pat[None]
    names = list(head_names or [f"head {h}" for h in range(pat.shape[0])])
    n = len(tokens)
    lab = _labels(tokens)
    fig = go.Figure()
    for h in range(pat.shape[0]):
        fig.add_trace(go.Heatmap(z=pat[h, :n, :n].numpy(), x=lab, y=lab, zmin=0, zmax=1, colorscale="Blues",
                                 visible=h == 0, name=names[h], colorbar=dict(title="attention"),
                                 hovertemplate="query %{y}<br>source %{x}<br>weight %{z:.3f}<extra>" + names[h] + "</extra>"))
    if pat.shape[0] > 1:
        buttons = [dict(label=names[h], method="update",
                        args=[{"visible": [i == h for i in range(pat.shape[0])]}, {"title": f"{title} ({names[h]})"}])
                   for h in range(pat.shape[0])]
        fig.update_layout(updatemenus=[dict(buttons=buttons, direction="down", x=1.0, y=1.15, showactive=True)])
    return fig.update_layout(title=f"{title} ({names[0]})" if title else names[0], xaxis_title="source (key)",
                             yaxis_title="query", yaxis_autorange="reversed", height=max(400, 14 * n + 150))


def pattern_html(pattern: torch.Tensor, tokens: Sequence[str], *, title: str = "") -> str:
    """One head's pattern as a plain HTML grid (cell shade = weight), with token labels; for Jupyter and reports."""
    pat = pattern.float().cpu()
    n = min(len(tokens), MAX_HTML_TOKENS)
    esc = [html.escape(repr(t)) for t in tokens[:n]]
    head = "".join(f"<th style='writing-mode:vertical-rl;font-weight:normal'>{t}</th>" for t in esc)
    rows = []
    for q in range(n):
        cells = "".join(
            f"<td title='{esc[q]} → {esc[k]}: {float(pat[q, k]):.3f}' style='width:12px;height:12px;padding:0;"
            f"background:rgba(31,119,180,{float(pat[q, k]):.3f})'></td>" for k in range(n))
        rows.append(f"<tr><th style='text-align:right;font-weight:normal'>{esc[q]}</th>{cells}</tr>")
    more = "" if n == len(tokens) else f"<div class='note'>first {n} of {len(tokens)} tokens</div>"
    return (f"<div style='display:inline-block;margin:6px;vertical-align:top'><div><b>{html.escape(title)}</b></div>"
            f"<table style='border-collapse:collapse;font-size:10px'><tr><th></th>{head}</tr>{''.join(rows)}</table>{more}</div>")


def flow_figure(graph):
    """The flow graph: tokens across, layers up; one line per edge, width ∝ |weight|, red positive, blue negative."""
    import plotly.graph_objects as go

    df = graph.edges
    n, L = len(graph.str_tokens), graph.n_layers
    fig = go.Figure()
    xs, ys = zip(*[(p, l) for l in range(L + 1) for p in range(n)]) if n else ((), ())
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(size=5, color="#ccc"), hoverinfo="skip",
                             showlegend=False))
    top = float(df["weight"].abs().max()) if len(df) else 1.0
    for e in df.itertuples():
        if e.kind == "embed":
            x, y = [e.source, e.source], [-0.4, 0]
        elif e.kind == "mlp":
            x, y = [e.source, e.destination], [e.layer, e.layer + 1]
        else:
            x, y = [e.source, e.destination], [e.layer, e.layer + 1]
        label = {"attn": f"head {e.layer}.{e.head}", "mlp": f"mlp {e.layer}", "embed": "embed"}[e.kind]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines", showlegend=False, opacity=0.8,
            line=dict(width=0.5 + 7 * abs(e.weight) / max(top, 1e-12), color="#c0392b" if e.weight > 0 else "#2471a3",
                      dash="dot" if e.kind == "mlp" else "solid"),
            hovertext=f"{label}: {e.source_token!r} → {e.destination_token!r}, weight {e.weight:.4g} (level {e.level})",
            hoverinfo="text"))
    fig.add_trace(go.Scatter(x=[graph.position], y=[L], mode="markers", marker=dict(size=12, color="black", symbol="star"),
                             name=f"target {graph.target!r}", hoverinfo="name"))
    return fig.update_layout(
        title=f"Information flow to {graph.target!r} in {graph.model_name} (value {graph.value:.3g}; exact edges, "
              f"threshold {graph.threshold:g})",
        xaxis=dict(tickmode="array", tickvals=list(range(n)), ticktext=_labels(graph.str_tokens), title="position"),
        yaxis=dict(title="layer (residual before block)", range=[-0.6, L + 0.4]), height=max(450, 22 * L + 200))


def source_figure(dec, *, prompt: int = 0, sel: int = 0, target: int = 0, top: int = 12):
    """``unit="source"``: the ``top`` heads (by |contribution|) × the source tokens they read from, one prompt."""
    import plotly.graph_objects as go

    df = dec.to_dataframe()
    df = df[(df["kind"] == "source") & (df["prompt"] == prompt) & (df["sel"] == sel) & (df["target_index"] == target)]
    df = df.assign(name="head." + df["layer"].astype(str) + "." + df["head"].astype(str))
    per_head = df.groupby("name", sort=False)["value"].sum()
    heads = per_head.abs().sort_values(ascending=False).index[:top]
    grid = df[df["name"].isin(heads)].pivot(index="name", columns="source", values="value").reindex(heads)
    toks = dec.str_tokens[prompt]
    fig = go.Figure(go.Heatmap(z=grid.values, x=[f"{k}:{toks[k]!r}" for k in grid.columns], y=list(grid.index),
                               colorscale="RdBu", zmid=0, colorbar=dict(title="contribution")))
    return fig.update_layout(title=f"Where the top heads read from (prompt {prompt}, target {df['target'].iloc[0]!r})"
                             if len(df) else "Where the top heads read from", xaxis_title="source position",
                             yaxis_title="head", yaxis_autorange="reversed")


def paths_figure(paths, *, n: int = 20):
    """The ``n`` largest two-step value paths (mean over prompts) as horizontal bars."""
    import plotly.graph_objects as go

    top = paths.top(n)
    names = [f"{w} @ {s} → head.{l}.{h}" for w, s, l, h in zip(top["writer"], top["source"], top["layer"], top["head"])]
    fig = go.Figure(go.Bar(x=top["value"], y=names, orientation="h"))
    return fig.update_layout(title=f"Value paths in {paths.model_name} (exact at the value norm's frozen scale)",
                             xaxis_title="contribution to the target", yaxis_autorange="reversed",
                             height=max(400, 22 * len(names) + 150))


def removal_figure(rem, *, prompt: int = 0):
    """The head's pattern clean and with the writer removed from one of its inputs, side by side."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    toks = rem.str_tokens[prompt]
    n, lab = len(toks), _labels(toks)
    fig = make_subplots(1, 2, subplot_titles=("clean", f"{rem.writer} removed from the {rem.input}"))
    for j, pat in enumerate((rem.pattern_clean, rem.pattern_removed)):
        fig.add_trace(go.Heatmap(z=pat[prompt, :n, :n].numpy(), x=lab, y=lab, zmin=0, zmax=1, colorscale="Blues",
                                 showscale=j == 1), 1, j + 1)
    fig.update_yaxes(autorange="reversed")
    return fig.update_layout(title=f"head.{rem.head[0]}.{rem.head[1]} of {rem.model_name}", height=max(420, 12 * n + 200))
