"""Targeted removal: take one upstream writer out of a single head's query, key or value input only.

A head's pattern comes from its queries and keys through a softmax, so the writes that form them have
no exact additive share (see :mod:`streamlens.readout.sources`). Their role is measured causally:
in block ``L``, the head reads ``ln1(x)`` three times (query, key, value projections). Here exactly
one of those reads, for exactly one head, sees ``ln1(x − w)`` instead, where ``w`` is the upstream
writer's recorded write at every position (the norm is recomputed); every other head, the other two
reads and the rest of the model see the clean stream. With grouped-query attention a key/value head
is shared by a group of query heads; removing from the key or value input changes the whole group.

The writer grammar is the layer-skip unit grammar (:func:`streamlens.intervene.units.parse_unit`:
``"head.0.3"``, ``"attn.0"``, ``"mlp.0"``, ``"block.0"``) plus ``"embed"`` (everything that enters block 0).

Example:
    >>> rem = sl.remove_from_input(model, "The capital of France is", head="head.2.1", writer="head.0.3",
    ...                            input="key", target=" Paris")
    >>> rem.pattern_clean.shape            # (batch, query, source) of head 2.1
    torch.Size([1, 6, 6])
    >>> bool((rem.pattern_removed != rem.pattern_clean).any())
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.intervene.units import parse_heads, parse_unit
from streamlens.model import hooks
from streamlens.model.loading import as_model
from streamlens.present.results import Result, fmt
from streamlens.stream.attention import attention_component, kv_index
from streamlens.stream.inputs import encode, select_positions
from streamlens.stream.trace import trace

INPUTS = ("query", "key", "value")


@dataclass(frozen=True, eq=False)
class InputRemoval(Result):
    """Head ``head``'s pattern (and the target's value) with ``writer`` removed from its ``input`` only.

    ``pattern_clean`` / ``pattern_removed``: ``(batch, query, source)`` over every position;
    ``target_clean`` / ``target_removed``: ``(batch, sel, target)`` at ``positions`` (None without a target).
    """

    model_name: str
    head: tuple[int, int]
    writer: str
    input: str
    pattern_clean: Float[Tensor, "batch query source"] = field(repr=False)
    pattern_removed: Float[Tensor, "batch query source"] = field(repr=False)
    mask: Tensor = field(repr=False)
    str_tokens: tuple[tuple[str, ...], ...] = field(repr=False)
    positions: Int[Tensor, "batch sel"] | None = field(repr=False, default=None)
    target_clean: Float[Tensor, "batch sel target"] | None = field(repr=False, default=None)
    target_removed: Float[Tensor, "batch sel target"] | None = field(repr=False, default=None)

    def pattern_change(self) -> Float[Tensor, "batch query"]:
        """Total variation between the clean and the changed pattern row at each query (0: same, 1: disjoint)."""
        return 0.5 * (self.pattern_removed - self.pattern_clean).abs().sum(-1) * self.mask

    def to_dataframe(self) -> pd.DataFrame:
        """One row per (prompt, query position): the pattern's total variation, the most-attended source
        clean and after the removal; with a target, one column per target value clean/removed at the chosen
        positions (other queries: NaN)."""
        tv = self.pattern_change()
        rows = []
        for i, toks in enumerate(self.str_tokens):
            for q in range(len(toks)):
                c, r = int(self.pattern_clean[i, q].argmax()), int(self.pattern_removed[i, q].argmax())
                rows.append({"prompt": i, "position": q, "token": toks[q], "pattern_change": float(tv[i, q]),
                             "top_source_clean": c, "top_source_removed": r,
                             "weight_on_clean_top": float(self.pattern_removed[i, q, c]),
                             "clean_weight_on_clean_top": float(self.pattern_clean[i, q, c])})
        df = pd.DataFrame(rows)
        if self.target_clean is not None:
            for s in range(self.positions.shape[1]):
                for t in range(self.target_clean.shape[-1]):
                    for name, val in (("target_clean", self.target_clean), ("target_removed", self.target_removed)):
                        col = f"{name}_{t}"
                        for i in range(len(self.str_tokens)):
                            df.loc[(df.prompt == i) & (df.position == int(self.positions[i, s])), col] = float(val[i, s, t])
        df.insert(0, "head", f"head.{self.head[0]}.{self.head[1]}")
        df.insert(1, "writer", self.writer)
        df.insert(2, "input", self.input)
        return df

    def plot(self, prompt: int = 0):
        from streamlens.present.attention import removal_figure

        return removal_figure(self, prompt=prompt)

    def metadata(self) -> dict:
        return {"model": self.model_name, "head": f"head.{self.head[0]}.{self.head[1]}", "writer": self.writer,
                "input": self.input}

    def describe(self) -> str:
        return (f"of {self.model_name}: {self.writer} removed from the {self.input} input of head.{self.head[0]}."
                f"{self.head[1]} only; mean pattern change {fmt(float(self.pattern_change().sum() / self.mask.sum()))}")

    def __repr__(self) -> str:
        return (f"InputRemoval({self.model_name!r}, head=head.{self.head[0]}.{self.head[1]}, writer={self.writer!r}, "
                f"input={self.input!r}, mean pattern change={float(self.pattern_change().sum() / self.mask.sum()):.3f})")


def _writer_write(model, batch, writer: str) -> Tensor:
    """The writer's recorded write at every position, ``(batch, pos, d_model)``, from one clean trace."""
    if writer == "embed":
        return trace(model, batch.input_ids, layers=[0], sublayers=("attn",))["resid_pre", 0].float()
    unit = parse_unit(model, writer)
    if unit.kind not in ("head", "attn", "mlp", "block"):
        raise StreamlensError(f"writer {writer!r}: choose one head, attention, MLP or block ('head.0.3', 'mlp.0', ...)")
    (atom,) = unit.atoms
    tr = trace(model, batch.input_ids, layers=[atom.layer], heads=atom.kind == "head")
    if atom.kind == "head":
        return tr["head_out", atom.layer][:, :, atom.head].float()
    if atom.kind == "block":
        return (tr["resid_post", atom.layer] - tr["resid_pre", atom.layer]).float()
    return tr[f"{atom.kind}_out", atom.layer].float()


def remove_from_input(model, inputs, *, head, writer: str, input: str = "key", target=None, contrast=None,
                      positions=-1) -> InputRemoval:
    """Remove ``writer`` from ``head``'s ``input`` (``"query"``, ``"key"`` or ``"value"``) only, and measure.

    Args:
        model: a :class:`~streamlens.Model`.
        inputs: prompts or token ids (one padded batch).
        head: ``"head.L.H"`` or ``(L, H)``.
        writer: an upstream writer (layer < L): ``"head.l.h"``, ``"attn.l"``, ``"mlp.l"``, ``"block.l"`` or ``"embed"``.
        input: which of the head's reads sees the stream without the writer.
        target, contrast, positions: optionally, the target's value (logit or logit difference) clean and after.

    Returns:
        :class:`InputRemoval` with the head's full pattern clean and changed.
    """
    from streamlens.readout.targets import resolve  # the target grammar, only when a target is asked for

    model = as_model(model)
    if input not in INPUTS:
        raise StreamlensError(f"input must be one of {INPUTS}, got {input!r}")
    (L, H), = parse_heads(model, head)
    if writer != "embed":
        wl = parse_unit(model, writer).first_layer
        if wl >= L:
            raise StreamlensError(f"writer {writer!r} (layer {wl}) is not upstream of head.{L}.{H}: choose a layer below {L}")
    a = model.arch
    batch = encode(model, inputs)
    w = _writer_write(model, batch, writer).to(model.device)
    ln1 = hooks.block_component(model.bridge, L, "ln1")
    if ln1 is None or not a.rule.additive:
        raise StreamlensError(f"{model.name}: layer {L}'s attention does not read through its own norm ln1, so its "
                              "query/key/value inputs cannot be changed separately")
    proj = attention_component(model, L, {"query": "q", "key": "k", "value": "v"}[input])
    j = H if input == "query" else int(kv_index(a)[H])
    sl = slice(j * a.d_head, (j + 1) * a.d_head)
    held: dict[str, Tensor] = {}

    def replace(t: Tensor) -> Tensor:
        x = held["x"]
        changed = proj.original_component(ln1.original_component(x - w.reshape(x.shape).to(x.dtype)))
        t = t.clone()
        t[..., sl] = changed.reshape(t.shape)[..., sl]
        return t

    pats: dict[str, Tensor] = {}
    pat_hp = hooks.hook_point(hooks.block_component(model.bridge, L, "attn"), "pattern")
    grab = lambda key: (pat_hp, lambda t: pats.__setitem__(key, t[:, H].detach().float().cpu()))  # noqa: E731
    with torch.no_grad():
        with hooks.attached([grab("clean")]):
            clean = model.run(batch.input_ids, batch.mask)
        with hooks.attached([(hooks.hook_point(ln1, "in"), lambda t: held.__setitem__("x", t)),
                             (hooks.hook_point(proj, "out"), replace), grab("removed")]):
            removed = model.run(batch.input_ids, batch.mask)
    out = dict(model_name=model.name, head=(L, H), writer=writer, input=input, pattern_clean=pats["clean"],
               pattern_removed=pats["removed"], mask=batch.mask, str_tokens=batch.str_tokens)
    if target is not None:
        pos_idx, _ = select_positions(batch, positions)
        tgt = resolve(model, target, contrast, len(batch))
        if tgt.kind not in ("token", "logit_diff"):
            raise StreamlensError("remove_from_input: the target must be a token (or one per prompt), with an optional contrast")
        bidx = torch.arange(len(batch))[:, None]

        def value(lg):
            lg = lg.float().cpu()[bidx, pos_idx]
            v = lg.gather(-1, tgt.ids[:, None, None].expand(*pos_idx.shape, 1))
            return v if tgt.contrast is None else v - lg.gather(-1, tgt.contrast[:, None, None].expand(*pos_idx.shape, 1))

        out.update(positions=pos_idx, target_clean=value(clean), target_removed=value(removed))
    return InputRemoval(**out)
