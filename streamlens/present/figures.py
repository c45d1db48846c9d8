"""Every plotly figure streamlens draws. plotly is imported inside each builder, never at import time.

Result objects' ``.plot()`` methods and the HTML report call these; they take data, never models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from streamlens.errors import StreamlensError


# ---------------------------------------------------------------------------- the stream


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

def gradient_split_figure(df: pd.DataFrame, *, title: str):
    """Per-layer gradient norms at ``resid_pre``: the full gradient, its identity and sub-layer parts (log scale)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for col in ("grad_full_norm", "grad_identity_norm", "grad_sublayer_norm"):
        fig.add_trace(go.Scatter(x=df["layer"], y=df[col], mode="lines+markers", name=col))
    fig.update_yaxes(type="log")
    return fig.update_layout(title=title, xaxis_title="layer", yaxis_title="mean ‖gradient‖", template="plotly_white")


# ---------------------------------------------------------------------------- readouts


def decomposition_figure(dec):
    """Bars per component (mean over prompts and targets, with standard errors); a heatmap when there is more.

    * ``unit="head"``: a layer × head grid of the heads' mean contributions;
    * several positions: component × position heatmap of the mean contribution;
    * otherwise: one bar per component with the standard error over prompts as error bars.
    """
    import plotly.graph_objects as go

    df = dec.to_dataframe()
    title = f"Logit decomposition of {dec.model_name} ({dec.target_kind} target, unit={dec.unit})"
    if dec.unit == "head":
        heads = df[df["kind"] == "head"].groupby(["layer", "head"])["value"].mean().unstack("head")
        fig = go.Figure(go.Heatmap(z=heads.values, x=[f"H{h}" for h in heads.columns], y=[f"L{l}" for l in heads.index],
                                   colorscale="RdBu", zmid=0, colorbar=dict(title="mean value")))
        # the grid holds the heads only: say what is left out, so no one reads it as the whole model
        left_out = sorted(set(df["kind"]) - {"head"})
        return fig.update_layout(title=f"{title}: attention heads only; MLPs and the other writers ({', '.join(left_out)}) "
                                       "are left out (see unit='layer')", xaxis_title="head", yaxis_title="layer")
    if dec.values.shape[2] > 1:
        grid = df.groupby(["component", "sel"], sort=False)["value"].mean().unstack("sel")
        fig = go.Figure(go.Heatmap(z=grid.values, x=[f"sel {s}" for s in grid.columns], y=list(grid.index),
                                   colorscale="RdBu", zmid=0, colorbar=dict(title="mean value")))
        return fig.update_layout(title=title, xaxis_title="position (index into the chosen positions)",
                                 yaxis_title="component", yaxis_autorange="reversed")
    m = dec.mean().groupby("component", sort=False).agg(mean=("mean", "mean"), sem=("sem", "mean")).reset_index()
    fig = go.Figure(go.Bar(x=m["component"], y=m["mean"], error_y=dict(type="data", array=m["sem"])))
    return fig.update_layout(title=title, xaxis_title="component", yaxis_title="contribution to the logit")


def lens_figure(lens, *, prompt: int = 0):
    """Point × position heatmap for one prompt: the target probability (or KL to the final distribution), top token as text."""
    import plotly.graph_objects as go

    df = lens.to_dataframe()
    df = df[df["prompt"] == prompt]
    z_col = "target_prob" if "target_prob" in df else "kl"
    order = list(dict.fromkeys(df["point"]))
    z = df.pivot(index="point", columns="position", values=z_col).reindex(order)
    text = df.pivot(index="point", columns="position", values="top_token").reindex(order)
    toks = lens.str_tokens[prompt] if lens.str_tokens else None
    x = [f"{p}: {toks[p]!r}" if toks else str(p) for p in z.columns]
    fig = go.Figure(go.Heatmap(z=z.values, x=x, y=order, text=text.values, texttemplate="%{text}",
                               colorscale="Viridis", colorbar=dict(title=z_col)))
    return fig.update_layout(title=f"Logit lens of {lens.model_name} (prompt {prompt})", xaxis_title="position",
                             yaxis_title="residual", yaxis_autorange="reversed")


# ---------------------------------------------------------------------------- layer skipping
def sweep_figure(sweep, metric: str):
    """Bars with bootstrap intervals per unit; a width × start heatmap for spans; the greedy pruning curve."""
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


# ---------------------------------------------------------------------------- dynamics
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


# ---------------------------------------------------------------------------- report charts
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
