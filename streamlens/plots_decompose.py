"""Plotly figures for :class:`~streamlens.LogitDecomposition` and :class:`~streamlens.LogitLens` (plotly imported lazily)."""

from __future__ import annotations


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
        return fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer")
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
