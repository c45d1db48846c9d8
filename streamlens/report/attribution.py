"""One decomposed prediction as JSON (``streamlens attribute --format json``) and as an HTML page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from streamlens.present import figures
from streamlens.present.html import HtmlReport


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
    rep.figure("Contributions", figures.layer_bars(comps.assign(component=comps["name"]), x="component", y="value", color="kind",
                                           title="exact direct contribution of each writer", y_title="logit contribution"))
    rep.table("Components", pd.DataFrame(payload["components"]), max_rows=200)
    return rep.write(path)
