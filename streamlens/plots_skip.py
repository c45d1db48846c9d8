"""Figures for :class:`streamlens.SkipSweep` (plotly, imported lazily): bars with bootstrap intervals,
a width × start heatmap for spans, and the greedy pruning curve."""

from __future__ import annotations

from streamlens.errors import StreamlensError


def plot_sweep(sweep, metric: str):
    import plotly.graph_objects as go

    df = sweep.table
    if metric not in df.columns:
        raise StreamlensError(f"metric {metric!r} is not in this sweep (it has {list(sweep.metrics)})")
    title = f"{sweep.model_name}: {metric} when each {sweep.kind} is removed (mode {sweep.mode!r})"
    if sweep.kind == "prune":
        fig = go.Figure(go.Scatter(
            x=df["step"], y=df[metric], mode="lines+markers", text=df["unit"],
            error_y=dict(type="data", symmetric=False, array=df[f"{metric}_hi"] - df[metric],
                         arrayminus=df[metric] - df[f"{metric}_lo"])))
        fig.update_layout(title=f"{sweep.model_name}: greedy pruning curve ({metric})",
                          xaxis_title="units removed", yaxis_title=metric)
        return fig
    if sweep.kind == "span" and df["width"].nunique() > 1:
        grid = df.pivot(index="width", columns="start", values=metric)
        fig = go.Figure(go.Heatmap(z=grid.values, x=list(grid.columns), y=list(grid.index), colorbar_title=metric))
        fig.update_layout(title=title, xaxis_title="first block removed", yaxis_title="span width")
        return fig
    fig = go.Figure(go.Bar(
        x=df["unit"], y=df[metric],
        error_y=dict(type="data", symmetric=False, array=df[f"{metric}_hi"] - df[metric],
                     arrayminus=df[metric] - df[f"{metric}_lo"])))
    fig.update_layout(title=title, xaxis_title="unit removed", yaxis_title=metric)
    return fig
