"""Plotly figures for :class:`streamlens.Dynamics` (imported lazily by ``Dynamics.plot``)."""

from __future__ import annotations

import pandas as pd

_DASH = {"trained": "solid", "init": "dot", "dropped": "dash", "init_dropped": "dashdot"}
_PANELS = (
    ("relative update ‖resid_post − resid_pre‖/‖resid_pre‖", ("block_rel_update", "attn_rel_update", "mlp_rel_update"), False),
    ("gradient norm at resid_pre (log)", ("grad_full_norm", "grad_identity_norm", "grad_sublayer_norm"), True),
    ("cosines", ("cos_pre_post", "cos_embed"), False),
    ("‖resid_post‖ / ‖resid_pre of layer 0‖", ("resid_norm_growth",), False),
)


def dynamics_figure(table: pd.DataFrame, *, title: str):
    """Four panels of per-layer lines: update sizes, gradient norms through each path, cosines, stream growth.

    One line per statistic and variant; the variant sets the dash (trained solid, init dotted,
    dropped dashed, init_dropped dash-dotted), the statistic the colour.
    """
    import plotly.express as px
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    panels = [p for p in _PANELS if any(c in table for c in p[1])]
    fig = make_subplots(rows=2, cols=2, subplot_titles=[p[0] for p in panels])
    colours = px.colors.qualitative.Plotly
    stats = [c for p in panels for c in p[1] if c in table]
    for i, (_, cols, log) in enumerate(panels):
        r, c = divmod(i, 2)
        for col in cols:
            if col not in table:
                continue
            for variant, df in table.groupby("variant", sort=False):
                df = df.sort_values("layer")
                fig.add_trace(go.Scatter(x=df["layer"], y=df[col], mode="lines+markers", name=f"{col} ({variant})",
                                         line=dict(dash=_DASH.get(variant, "solid"),
                                                   color=colours[stats.index(col) % len(colours)])),
                              row=r + 1, col=c + 1)
        if log:
            fig.update_yaxes(type="log", row=r + 1, col=c + 1)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(title=title, height=700, template="plotly_white")
    return fig
