"""The per-layer report over a data set: its sections and :func:`build_report`.

:func:`build_report` writes into a folder of its own a self-contained HTML report plus CSV/JSON files: a trace
summary with its closure check, an exact decomposition of a few prompts' next-token predictions (mean
contribution per layer and head, with intervals), a logit lens, a block-skip sweep and the per-layer
dynamics of the stream. ``streamlens report`` is a thin layer over it; :func:`streamlens.report.demo.run_demo`
runs it on SmolLM2 and a built-in corpus.

Nothing is lost: before computing anything the report checks the files it will write, and refuses
to overwrite any that exists (it did not create it in this run) unless ``force=True``
(``--force``); it then writes only those files and says where (``DemoResult.out_dir``, ``files``).
The start-token choice (``prepend_bos``) is recorded in the report's facts and its summary JSON.

Every number in the report and in :attr:`DemoResult.summary` is computed from the model; a section
that a model does not support (e.g. the exact decomposition of a post-norm model) is marked "not
computed" with the library's reason.

Example:
    >>> res = build_report(model, texts, "report-out", max_tokens=16, progress=False)
    >>> res.summary            # one row per headline quantity
    >>> res.report             # Path to report-out/report.html
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from streamlens.present import figures
from streamlens.present import tables
from streamlens.present.html import HtmlReport
from streamlens.present.results import Result
from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.model.precision import check_tol

CLOSURE_TOL = 1e-4  # float32; bfloat16/float16 models: check_tol (their own rounding)
DECOMPOSE_TOL = 1e-4
LENS_KL_CLOSE = 0.5  # nats: "the lens already reads nearly the final distribution"


@dataclass(eq=False)
class DemoResult(Result):
    """What :func:`run_demo` / :func:`run_report` wrote and the headline numbers.

    Attributes:
        out_dir: the output folder.
        report: path of the HTML report.
        files: every file written (report, CSV, JSON).
        summary: one row per headline quantity: ``section``, ``quantity``, ``value``.
        tables: the full tables behind the report, by name.
        missing: sections that were not computed, with the reason.
        wall_s: seconds the whole run took.
    """

    out_dir: Path
    report: Path
    files: list[Path]
    summary: pd.DataFrame
    tables: dict[str, pd.DataFrame] = field(repr=False)
    missing: dict[str, str]
    wall_s: float

    def to_dataframe(self) -> pd.DataFrame:
        return self.summary.copy()

    def plot(self):
        """The summary as a plotly table."""
        import plotly.graph_objects as go

        df = self.summary.astype(str)
        return go.Figure(go.Table(header=dict(values=list(df.columns)), cells=dict(values=[df[c] for c in df])))

    def metadata(self) -> dict[str, Any]:
        return {"report": str(self.report), "files": [str(f) for f in self.files], "missing": self.missing,
                "wall_s": self.wall_s}

    def describe(self) -> str:
        return f"report {self.report} ({len(self.files)} files, {self.wall_s:.1f} s)"


#: The CSV tables a report writes (``<name>.csv``), besides the HTML, its summary JSON and the sweep's rows.
TABLES = ("decompose_layer", "decompose_head", "decompose_layer_mean", "decompose_head_mean", "decompose_source",
          "flow_graph", "trace_prompts", "block_update_heatmap", "trace_corpus", "logit_lens", "skip_sweep", "dynamics",
          "dynamics_claims")
SWEEP_ROWS = "skip_sweep.jsonl"


def report_files(out: Path) -> list[Path]:
    """Every file a report at ``out`` (its HTML path) may write."""
    return [out, out.parent / f"{out.stem}_summary.json", out.parent / SWEEP_ROWS,
            *(out.parent / f"{name}.csv" for name in TABLES)]


def _claim_files(out: Path, force: bool) -> None:
    """Refuse, before any work, to overwrite files this run did not create (unless ``force``)."""
    there = [p for p in report_files(out) if p.exists()]
    if there and not force:
        names = ", ".join(p.name for p in there[:4]) + (f" and {len(there) - 4} more" if len(there) > 4 else "")
        raise StreamlensError(f"{out.parent} already holds {names}, which this report would overwrite: choose another "
                              "output folder, or pass force=True (--force) to overwrite them")
    if out.parent.exists() and not out.parent.is_dir():
        raise StreamlensError(f"cannot write the report into {str(out.parent)!r}: it is a file, not a folder")


def _report_path(out: str | Path) -> Path:
    """``out`` as the HTML path: a folder gets ``report.html`` inside it; an ``.html`` path is used as it is."""
    out = Path(out)
    return out if out.suffix.lower() in (".html", ".htm") else out / "report.html"


class _Run:
    """State shared by the sections of one report."""

    def __init__(self, model, out_dir: Path, title: str, progress: bool, prepend_bos: bool | None = None):
        self.model, self.out_dir, self.progress, self.prepend_bos = model, out_dir, progress, prepend_bos
        self.html = HtmlReport(title, subtitle=f"model {model.name}; generated by streamlens")
        self.files: list[Path] = []
        self.rows: list[dict[str, Any]] = []
        self.tables: dict[str, pd.DataFrame] = {}
        self.missing: dict[str, str] = {}

    def stat(self, section: str, quantity: str, value: Any) -> None:
        self.rows.append({"section": section, "quantity": quantity, "value": value})

    def csv(self, name: str, df: pd.DataFrame) -> None:
        if name not in TABLES:  # every file is announced in TABLES, so the overwrite check sees it first
            raise AssertionError(f"report table {name!r} is missing from TABLES")
        self.tables[name] = df
        self.files.append(tables.write_csv(df, self.out_dir / f"{name}.csv"))

    def gap(self, title: str, reason: str) -> None:
        self.missing[title] = reason
        self.html.missing(title, reason)




# ---------------------------------------------------------------------------- sections
def _section_trace(run: _Run, prompts: list[str], texts: list[str], *, batch_size: int, max_tokens: int) -> None:
    from streamlens.stream.stats import trace_stats
    from streamlens.stream.trace import trace

    model = run.model
    tr = trace(model, prompts, prepend_bos=run.prepend_bos)
    err = tr.closure_error()
    run.html.section("Residual-stream trace")
    run.html.check("Trace closure (resid_post = resid_pre + attn_out + mlp_out)", err, check_tol(model.dtype, CLOSURE_TOL),
                   what=f"largest relative deviation over {int(tr.mask.sum())} positions and {len(tr.layers)} layers")
    run.stat("trace", "closure error", err)
    df = tr.to_dataframe()
    run.csv("trace_prompts", df)

    # Relative size of each block's update at every position of the first prompt: layer x position.
    m = tr.mask[0]
    z = [((tr["resid_post", l][0] - tr["resid_pre", l][0]).float().norm(dim=-1)
          / tr["resid_pre", l][0].float().norm(dim=-1).clamp_min(1e-12))[m].tolist() for l in tr.layers]
    heat = pd.DataFrame([{"layer": l, "position": p, "token": tok, "block_rel_update": z[i][p]}
                         for i, l in enumerate(tr.layers) for p, tok in enumerate(tr.str_tokens[0])])
    run.csv("block_update_heatmap", heat)
    run.html.figure("Layer × position: relative block update ‖resid_post − resid_pre‖ / ‖resid_pre‖",
                    figures.layer_position_heatmap([[math.log10(max(v, 1e-12)) for v in row] for row in z],
                                              x_labels=tr.str_tokens[0], y_labels=tr.layers,
                                              title=f"prompt: {prompts[0]!r} (log10 scale: the first token's "
                                                    f"updates dwarf the rest)", colorbar="log10 rel. update"))

    stats = trace_stats(model, texts, batch_size=batch_size, max_tokens=max_tokens, progress=run.progress,
                        prepend_bos=run.prepend_bos)
    sdf = stats.to_dataframe()
    run.csv("trace_corpus", sdf)
    run.html.figure(f"Residual stream over the corpus ({int(sdf['n_positions'].iloc[0])} tokens)", stats.plot())
    run.html.table(None, sdf)
    big = sdf.loc[sdf["block_rel_update"].idxmax()]
    run.stat("trace", "largest mean block update (layer)", int(big["layer"]))
    run.stat("trace", "largest mean block update (rel.)", float(big["block_rel_update"]))
    run.stat("trace", "median block update (rel.)", float(sdf["block_rel_update"].median()))


def _section_decompose(run: _Run, prompts: list[str]) -> None:
    from streamlens.readout.decompose import decompose

    title = "Direct logit attribution of the next-token prediction"
    # "top:1": each prompt is attributed for the token the model itself predicts next.
    layer_dec = decompose(run.model, prompts, "top:1", unit="layer", progress=False, prepend_bos=run.prepend_bos)
    head_dec = decompose(run.model, prompts, "top:1", unit="head", progress=False, prepend_bos=run.prepend_bos)
    err = max(layer_dec.check(), head_dec.check())
    layer_df, head_df = layer_dec.to_dataframe(), head_dec.to_dataframe()
    targets = layer_df.drop_duplicates("prompt")["target"].tolist()
    run.html.section(title)
    run.html.check("Decomposition exactness (sum of components + bias = the model's logit)", err,
                   check_tol(run.model.dtype, DECOMPOSE_TOL),
                   what=f"{len(prompts)} prompts; targets are the model's own top-1 tokens: {targets}")
    run.stat("decompose", "exactness error", err)
    run.csv("decompose_layer", layer_df)
    run.csv("decompose_head", head_df)
    per = tables.mean_interval(layer_df, ["component", "kind", "layer"])
    run.csv("decompose_layer_mean", per)
    blocks = per[per["layer"].notna()].astype({"layer": int}).sort_values(["layer", "kind"])
    run.html.figure(None, _bars_with_ci(blocks))
    run.html.table(None, per[per["layer"].isna()])  # embeddings and the bias term
    heads = tables.mean_interval(head_df[head_df["kind"] == "head"], ["component", "layer", "head"])
    run.csv("decompose_head_mean", heads)
    top = heads.reindex(heads["mean"].abs().sort_values(ascending=False).index).head(10)
    run.html.table("Heads with the largest mean direct contribution", top)
    best = per.loc[per["mean"].idxmax()]
    run.stat("decompose", "top component", str(best["component"]))
    run.stat("decompose", "top component mean logit", float(best["mean"]))
    run.stat("decompose", "mean model logit", float(layer_dec.model_values.mean()))


def _section_attention(run: _Run, prompts: list[str]) -> None:
    """Where the next-token prediction of the first prompt was read from: per source, flow graph, patterns."""
    from streamlens.present.attention import pattern_figure
    from streamlens.readout.decompose import decompose
    from streamlens.readout.flow import information_flow
    from streamlens.stream.attention import attention_patterns

    title = "Attention reads across positions"
    dec = decompose(run.model, prompts[:1], "top:1", unit="source", progress=False)
    err = dec.check()
    df = dec.to_dataframe()
    src = df[df["kind"] == "source"]
    run.html.section(title)
    run.html.check("Per-source exactness (heads split by source position, + the rest = the model's logit)", err,
                   check_tol(run.model.dtype, DECOMPOSE_TOL), what=f"prompt {prompts[0]!r}, target {src['target'].iloc[0]!r}")
    run.stat("attention", "per-source exactness error", err)
    run.csv("decompose_source", src)
    per_head = src.groupby(["layer", "head"])["value"].sum()
    top = per_head.abs().sort_values(ascending=False).index[:8]
    rows = []
    for l, h in top:
        r = src[(src["layer"] == l) & (src["head"] == h)]
        best = r.loc[r["value"].abs().idxmax()]
        rows.append({"head": f"head.{l}.{h}", "contribution": float(per_head[(l, h)]), "reads most from": int(best["source"]),
                     "token": best["source_token"], "share from there": float(best["value"] / per_head[(l, h)])})
    run.html.table("Heads with the largest contribution and the source they read it from", pd.DataFrame(rows))
    run.html.figure(None, dec.plot())
    graph = information_flow(run.model, prompts[0], int(dec.target_ids[0, 0, 0]), threshold=0.03)
    run.stat("attention", "flow graph exactness error", graph.check())
    run.csv("flow_graph", graph.to_dataframe())
    run.html.figure("Information flow to the prediction (exact contributions; queries and keys are not split)",
                    graph.plot())
    l0, h0 = top[0]
    pats = attention_patterns(run.model, prompts[:1], layers=[int(l0)])
    run.html.figure(f"Attention patterns of layer {l0} (menu: head)",
                    pattern_figure(pats[int(l0)][0], pats.str_tokens[0], title=f"layer {l0}",
                                   head_names=[f"head {l0}.{h}" for h in range(pats.patterns.shape[2])]))
    run.stat("attention", "top head", f"head.{l0}.{h0}")


def _bars_with_ci(per: pd.DataFrame):
    per = per.assign(half=per["hi"] - per["mean"])
    return figures.layer_bars(per, x="layer", y="mean", error="half", color="kind",
                         title="mean direct contribution to the predicted token's logit (±95% interval)",
                         y_title="logit contribution")


def _section_lens(run: _Run, prompts: list[str]) -> None:
    from streamlens.readout.lens import logit_lens

    title = "Logit lens"
    lens = logit_lens(run.model, prompts[0], k=3, progress=False, prepend_bos=run.prepend_bos)  # every position of the first prompt
    full = lens.to_dataframe()
    run.csv("logit_lens", full.drop(columns=["top_tokens", "top_probs"]))
    run.html.figure(f"{title}: {prompts[0]!r}", lens.plot())
    last = tables.lens_table(lens)
    last = last[last["position"] == last["position"].max()]
    run.html.table(f"{title} at the last position: top-3 tokens read out of resid_post", last)
    first = last[last["kl"] <= LENS_KL_CLOSE]
    run.stat("lens", f"first layer with KL(model || lens) <= {LENS_KL_CLOSE}",
             int(first["layer"].min()) if len(first) else "none")
    run.stat("lens", "final top token", str(full.iloc[-1]["top_token"]))


def _section_sweep(run: _Run, texts: list[str], *, unit: str, batch_size: int, max_tokens: int) -> None:
    from streamlens.skip.evaluator import skip_sweep

    title = f"Skip sweep: each {unit} removed in turn"
    rows = run.out_dir / SWEEP_ROWS  # written row by row as the sweep runs
    rows.unlink(missing_ok=True)  # only there with force=True (checked before the run began)
    for stale in run.out_dir.glob(SWEEP_ROWS + ".docsums-*.jsonl"):  # the sweep's per-document sums, same rule
        stale.unlink()
    res = skip_sweep(run.model, texts, unit=unit, metrics=("kl", "ce", "top1"), batch_size=batch_size,
                     max_tokens=max_tokens, progress=run.progress, out=rows, prepend_bos=run.prepend_bos)
    run.files += [rows, *run.out_dir.glob(SWEEP_ROWS + ".docsums-*.jsonl")]
    df = res.to_dataframe()
    run.csv("skip_sweep", df)
    run.html.section(title)
    for metric, label in (("kl", "KL(clean ‖ skipped), nats"), ("delta_ce", "Δ cross-entropy, nats")):
        run.html.figure(None, figures.interval_chart(df, x="layer", y=metric, lo=f"{metric}_lo", hi=f"{metric}_hi",
                                                title=f"{label} when the {unit} is removed (95% bootstrap interval "
                                                      f"over {len(texts)} documents)", y_title=label))
    run.html.table(None, df)
    worst, mild = df.loc[df["kl"].idxmax()], df.loc[df["kl"].idxmin()]
    run.stat("sweep", f"most damaging {unit}", f"{worst['unit']} (KL {worst['kl']:.3g})")
    run.stat("sweep", f"least damaging {unit}", f"{mild['unit']} (KL {mild['kl']:.3g})")
    run.stat("sweep", "median KL of one removal", float(df["kl"].median()))
    run.stat("sweep", "median top-1 agreement", float(df["top1"].median()))


def _section_dynamics(run: _Run, texts: list[str], *, batch_size: int, max_tokens: int, gradients: bool) -> None:
    from streamlens.depth.claims import dynamics

    title = "Dynamics of the stream through depth"
    # post-norm models have no identity path to split the gradient along: forward statistics only
    gradients = gradients and run.model.arch.rule.additive
    res = dynamics(run.model, texts, batch_size=batch_size, max_tokens=max_tokens, progress=run.progress, gradients=gradients,
                   prepend_bos=run.prepend_bos)
    df = res.to_dataframe()
    run.csv("dynamics", df)
    run.html.figure(title, res.plot())
    claims = res.claims()
    claims = claims[claims["supported"].notna()]
    run.csv("dynamics_claims", claims)
    run.html.table("Claims about the residual stream, checked on this model", claims)
    for r in claims.itertuples():
        run.stat("dynamics", r.claim, f"{r.value:.3g} ({r.threshold}): {'yes' if r.supported else 'no'}")


# ---------------------------------------------------------------------------- pipelines
def _prompts_from(model, texts: Sequence[str], n: int, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` tokens of the first ``n`` texts, decoded back to text."""
    out = []
    for t in texts[:n]:
        ids = model.tokenizer(t)["input_ids"][:n_tokens]
        out.append(model.tokenizer.decode(ids, skip_special_tokens=True).strip())
    return out


def build_report(model, texts: Sequence[str], out: str | Path, *, title: str | None = None,
                 prompts: Sequence[str] | None = None, n_prompts: int = 4, prompt_tokens: int = 16,
                 unit: str = "block", batch_size: int = 8, max_tokens: int = 64, gradients: bool = True,
                 progress: bool = True, prepend_bos: bool | None = None, force: bool = False) -> DemoResult:
    """Write the per-layer report for ``model`` over ``texts`` into the folder ``out`` (``out/report.html`` and
    the CSV/JSON files beside it; an ``.html`` path names the HTML file and its folder holds the rest).

    Files already there that the report would write are refused before any work unless ``force``;
    ``prepend_bos`` is the start-token choice of every verb (:mod:`streamlens.stream.inputs`), recorded
    in the report.

    Prompts for the decomposition and the logit lens are ``prompts``, or else the first
    ``prompt_tokens`` tokens of the first ``n_prompts`` texts; each is attributed for the token the
    model itself predicts next.
    """
    from streamlens.model.loading import as_model
    from streamlens.stream.inputs import check_prepend_bos, resolve_bos

    t0 = time.perf_counter()
    model = as_model(model)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise StreamlensError("the data set is empty: give at least one non-empty text")
    out = _report_path(out)
    out_dir = out.parent
    _claim_files(out, force)
    prompts = list(prompts) if prompts else _prompts_from(model, texts, n_prompts, prompt_tokens)
    bos = resolve_bos(model, check_prepend_bos(prepend_bos))
    run = _Run(model, out_dir, title or f"streamlens report: {model.name}", progress, bos)
    facts = {"model": model.name, **model.arch.to_dict(), "corpus texts": len(texts),
             "max tokens per text": max_tokens, "prompts": len(prompts),
             "start token (BOS) prepended": f"{bos} ({model.tokenizer.bos_token!r})" if bos else "False"}
    run.html.facts("Model", facts)
    sections = (
        ("Direct logit attribution", lambda: _section_decompose(run, prompts)),
        ("Attention reads across positions", lambda: _section_attention(run, prompts)),
        ("Residual-stream trace", lambda: _section_trace(run, prompts, texts, batch_size=batch_size, max_tokens=max_tokens)),
        ("Logit lens", lambda: _section_lens(run, prompts)),
        ("Skip sweep", lambda: _section_sweep(run, texts, unit=unit, batch_size=batch_size, max_tokens=max_tokens)),
        ("Dynamics", lambda: _section_dynamics(run, texts, batch_size=batch_size, max_tokens=max_tokens,
                                               gradients=gradients)),
    )
    for title, section in sections:
        try:
            section()
        except UnsupportedModelError as e:  # e.g. no exact decomposition of a post-norm model
            run.gap(title, str(e))
    summary = pd.DataFrame(run.rows)
    run.files.append(tables.write_json({"model": model.name, "arch": model.arch.to_dict(), "prompts": prompts,
                                    "prepend_bos": bos, "max_tokens": max_tokens, "summary": summary,
                                    "missing": run.missing},
                                   out_dir / f"{out.stem}_summary.json"))
    run.files.insert(0, run.html.write(out))
    return DemoResult(out_dir, out, run.files, summary, run.tables, run.missing, time.perf_counter() - t0)


