"""Tables: plain-text tables for a terminal, CSV and JSON writers, and the summaries the report and CLI show.

    >>> print(text_table(sweep.to_dataframe()))
    >>> write_json({"model": model.name, "rows": df}, "out/summary.json")
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from streamlens.present.results import fmt, jsonable

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
    return df.to_string(index=False, float_format=fmt)


def mean_interval(df: pd.DataFrame, by: Sequence[str], value: str = "value", *, z: float = 1.96) -> pd.DataFrame:
    """Mean of ``value`` per group with a normal-approximation interval: columns mean, sem, lo, hi, n."""
    g = df.groupby(list(by), sort=True, dropna=False)[value]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["sem"] = (out["std"] / out["n"].clip(lower=1) ** 0.5).fillna(0.0)
    out["lo"], out["hi"] = out["mean"] - z * out["sem"], out["mean"] + z * out["sem"]
    return out.drop(columns="std")


def lens_table(lens, *, points: str = "resid_post") -> pd.DataFrame:
    """A compact logit-lens table: one row per ``points`` reading (``"all"`` for every point) and position."""
    df = lens.to_dataframe()
    if points != "all":
        df = df[df["kind"] == points]
    cols = ["point", "layer", "prompt", "position", "token", "top_tokens", "top_prob", "kl"]
    cols += [c for c in ("target", "target_prob", "target_rank") if c in df]
    out = df[cols].copy()
    out["top_tokens"] = [" | ".join(repr(t) for t in ts) for ts in out["top_tokens"]]
    return out.reset_index(drop=True)
