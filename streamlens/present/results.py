"""The one result contract: every result type carries its data and knows how to show and save it.

A result (``ResidualTrace``, ``TraceStats``, ``LogitDecomposition``, ``LogitLens``, ``SkipSweep``,
``Dynamics``, ``GradientSplit``, ...) subclasses :class:`Result` and provides

* ``to_dataframe()``: a tidy table (one row per layer / component / position / value);
* ``plot()``: a plotly figure (built in :mod:`streamlens.present.figures`, imported lazily);
* ``describe()``: one line saying what it is (used by Jupyter and ``repr``);
* optionally ``metadata()`` (what the numbers were computed from) and ``tensors()`` (for ``.pt``).

and inherits ``save(path)`` with **one suffix rule** for every result:

=========  ====================================================================================
suffix     what is written
=========  ====================================================================================
``.csv``   ``to_dataframe()``
``.jsonl`` ``to_dataframe()``, one JSON object per row
``.json``  one object: ``metadata()`` plus the rows under ``rows_key``
``.html``  ``plot()`` as a self-contained page (plotly.js inline, opens offline)
``.pt``    ``tensors()`` with ``metadata()``, for results that carry tensors
=========  ====================================================================================

Any other suffix is an error naming the ones this result supports. Numbers are shown with one
format everywhere (:func:`fmt`, 4 significant digits).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from streamlens.errors import StreamlensError

SUFFIXES = (".csv", ".jsonl", ".json", ".html", ".pt")


def fmt(v: Any) -> str:
    """The one number format: 4 significant digits, ``nan`` for NaN; anything else as ``str``."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors, numpy values, data frames and paths turned into plain JSON values (non-finite -> null)."""
    from collections.abc import Mapping

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
    if obj is pd.NA:
        return None
    return obj


class Result:
    """Base of every result type: ``save`` with one suffix rule, Jupyter rendering, one number format."""

    #: The key holding the rows in a ``.json`` file.
    rows_key: ClassVar[str] = "rows"
    #: Rows shown in Jupyter.
    html_rows: ClassVar[int] = 40
    #: ``(prepend_bos, ids, ends)`` set by the verb that made the result (:func:`streamlens.stream.inputs.recorded`):
    #: every token id it computed on in one int32 array, and where each sequence ends. Read it through
    #: :attr:`prepend_bos` and :attr:`token_ids`.
    recorded_inputs: ClassVar[tuple | None] = None

    @property
    def prepend_bos(self) -> bool | None:
        """Whether a BOS token was put in front of each text (None: not recorded, or it varied between calls)."""
        return None if self.recorded_inputs is None else self.recorded_inputs[0]

    @property
    def token_ids(self) -> tuple[tuple[int, ...], ...] | None:
        """The token ids the numbers were computed on: one tuple per sequence, without padding, in order."""
        if self.recorded_inputs is None:
            return None
        _, ids, ends = self.recorded_inputs
        return tuple(tuple(int(t) for t in ids[lo:hi]) for lo, hi in zip([0, *ends[:-1]], ends))

    def to_dataframe(self) -> pd.DataFrame:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def plot(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """One line saying what this result is."""
        return type(self).__name__

    def metadata(self) -> dict[str, Any]:
        """What the numbers were computed from (written into ``.json`` and ``.pt`` files)."""
        return {}

    def inputs(self) -> dict[str, Any]:
        """The start-token choice and the token ids behind the numbers (empty where not recorded)."""
        if self.token_ids is None:
            return {}
        return {"prepend_bos": self.prepend_bos, "token_ids": [list(t) for t in self.token_ids]}

    def tensors(self) -> dict[str, Any] | None:
        """The raw tensors for ``.pt`` files (None: this result has no tensors to save)."""
        return None

    def html_table(self) -> pd.DataFrame:
        """The table shown in Jupyter (default: ``to_dataframe()``)."""
        return self.to_dataframe()

    # ------------------------------------------------------------------ the contract
    def save(self, path: str | Path) -> Path:
        """Write this result; the suffix of ``path`` says what (see :mod:`streamlens.present.results`)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".pt" and self.tensors() is None:
            suffix = ""  # falls through to the error below
        if suffix not in SUFFIXES or not suffix:
            ok = [s for s in SUFFIXES if s != ".pt" or self.tensors() is not None]
            raise StreamlensError(f"cannot save a {type(self).__name__} as {path.name!r}: use one of {', '.join(ok)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            self.to_dataframe().to_csv(path, index=False)
        elif suffix == ".jsonl":
            self.to_dataframe().to_json(path, orient="records", lines=True)
        elif suffix == ".json":
            rows = json.loads(self.to_dataframe().to_json(orient="records"))
            path.write_text(json.dumps(jsonable({**self.metadata(), **self.inputs(), self.rows_key: rows}), indent=2))
        elif suffix == ".html":
            self.plot().write_html(path, include_plotlyjs=True)
        else:
            import torch

            torch.save({**self.metadata(), **self.inputs(), **self.tensors()}, path)
        return path

    def _repr_html_(self) -> str:
        table = self.html_table()
        return (f"<b>{type(self).__name__}</b> {html.escape(self.describe())}"
                + table.to_html(index=False, max_rows=self.html_rows, float_format=fmt))
