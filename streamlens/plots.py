"""Plotly figure builders. Imported lazily by the result objects' ``.plot()`` methods."""

from __future__ import annotations

import pandas as pd


def trace_summary(df: pd.DataFrame, *, title: str):
    """Three panels per layer: norms of the stream and the writes, relative update sizes, cos(pre, post)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=("norms", "relative update ‖write‖/‖read‖", "cos(resid_pre, resid_post)"))
    for col in ("resid_pre_norm", "attn_write_norm", "mlp_write_norm"):
        if col in df:
            fig.add_trace(go.Scatter(x=df["layer"], y=df[col], mode="lines+markers", name=col), row=1, col=1)
    for col in ("attn_rel_update", "mlp_rel_update", "block_rel_update"):
        if col in df:
            fig.add_trace(go.Scatter(x=df["layer"], y=df[col], mode="lines+markers", name=col), row=1, col=2)
    fig.add_trace(go.Scatter(x=df["layer"], y=df["cos_pre_post"], mode="lines+markers", name="cos_pre_post"), row=1, col=3)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=title, height=380, template="plotly_white")
    return fig
