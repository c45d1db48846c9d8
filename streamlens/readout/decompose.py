"""Exact logit decomposition: the model's logit split into one contribution per residual-stream writer.

In a pre-norm, parallel or sandwich model the final residual is a sum of writes,
``x = embed + pos_embed + Σ_l (attn_l + mlp_l)``, and the logits are ``W_U (g ⊙ C x / s(x) + b) + b_U``
(see :mod:`streamlens.norms`). Holding the final norm's scale ``s`` at the value it had on this input,
that map is affine, so for a readout ``(u, c)`` (see :mod:`streamlens.targets`)

    value(target) = Σ_i  u · (g ⊙ C x_i / s)      one contribution per writer i
                  + u · b + c                     the "bias" component

exactly, on the model's own weights (no folding or centring). ``dec.check()`` measures how far the
sum is from the logit the model really produced.

The frozen scale is a linearisation: removing a writer would change ``s``. The column
``ablated_logit_renormed`` gives the target's value with writer ``i`` removed *and the final norm
recomputed*, ``u · ln_final(x − x_i) + c``, and ``direct_effect_renormed = value(target) −
ablated_logit_renormed``: compare it with the exact ``value`` to see what freezing the scale costs.

Units: ``"layer"`` (embed, pos_embed, attn.l, mlp.l, bias), ``"head"`` (attn.l split into head.l.h plus
attn_bias.l, the output projection's bias) and ``"neuron"`` (the ``neurons`` largest-magnitude MLP
neurons of each chosen layer, chosen by mean |contribution| over the whole data set, plus
``mlp_rest.l``, the rest of that layer's write: other neurons and the down projection's bias) and
``"source"`` (every head split by the source position it read, ``head.l.h@k``, summing to the head's
``unit="head"`` value; see :mod:`streamlens.readout.sources`).

Post-norm models (BERT) are refused: every block renormalises, so the final residual is not a sum of
writes, and BERT's head applies a dense layer and GELU before its norm, so no per-writer split of the
logits is exact; streamlens raises rather than return a number that does not add up.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.model import hooks
from streamlens.model.loading import Model, as_model
from streamlens.present.results import Result, fmt
from streamlens.readout.components import BIAS, BatchDecomposition, Component
from streamlens.readout.writers import batch_writers, pick_logits
from streamlens.readout.neurons import neuron_values, split_neurons
from streamlens.readout.sources import NOTE_QK, check_source_target, pad_sources, source_valid, split_by_source
from streamlens.readout.targets import Target, readout, readouts, resolve
from streamlens.readout.unembed import require_linear_readout
from streamlens.stream.attention import AttentionReader
from streamlens.stream.inputs import Inputs, Positions, as_sequences, batches, encode, recorded, select_positions

UNITS = ("layer", "head", "neuron", "source", "expert")


# ---------------------------------------------------------------------------- the result
@dataclass(frozen=True, eq=False)
class LogitDecomposition(Result):
    """Per-writer contributions to a target's logit, for every prompt, position and target token.

    ``values[c, i, j, t]`` is ``components[c]``'s contribution at prompt ``i``, position
    ``positions[i, j]``, target ``t``; the last component is ``"bias"``. ``values.sum(0)`` equals
    ``model_values`` (the model's own logit, logit difference, or direction · final-norm output).
    """

    model_name: str
    unit: str
    target_kind: str
    components: tuple[Component, ...]
    values: Float[Tensor, "component prompt sel target"] = field(repr=False)
    ablated_renormed: Float[Tensor, "component prompt sel target"] = field(repr=False)
    model_values: Float[Tensor, "prompt sel target"] = field(repr=False)
    positions: Int[Tensor, "prompt sel"] = field(repr=False)
    target_ids: Int[Tensor, "prompt sel target"] | None = field(repr=False)
    contrast_ids: Int[Tensor, "prompt sel target"] | None = field(repr=False)
    target_names: dict[int, str] = field(repr=False, default_factory=dict)
    note: str = ""
    str_tokens: tuple[tuple[str, ...], ...] = field(repr=False, default=())  # each prompt's tokens (unit="source")
    causal: bool = True
    #: Soft-capped models (Gemma 2): the capped logits the model outputs; ``model_values`` (what the
    #: contributions add up to) are the logits before the cap. None otherwise.
    capped_values: Float[Tensor, "prompt sel target"] | None = field(repr=False, default=None)

    def __post_init__(self):
        n = len(self.components)
        if n != self.values.shape[0]:
            raise StreamlensError(f"{n} components for {self.values.shape[0]} rows of values: the decomposition is inconsistent")
        if self.values.shape != self.ablated_renormed.shape or self.values.shape[1:] != self.model_values.shape:
            raise StreamlensError("values, ablated_renormed and model_values differ in shape")

    # -------------------------------------------------------------- what each component is
    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(c.label for c in self.components)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(c.kind for c in self.components)

    @property
    def layers(self) -> tuple[int | None, ...]:
        return tuple(c.layer for c in self.components)

    @property
    def heads(self) -> tuple[int | None, ...]:
        return tuple(c.head for c in self.components)

    @property
    def neurons(self) -> tuple[int | None, ...]:
        return tuple(c.neuron for c in self.components)

    @property
    def sources(self) -> tuple[int | None, ...]:
        return tuple(c.source for c in self.components)

    # -------------------------------------------------------------- numbers
    def total(self) -> Float[Tensor, "prompt sel target"]:
        """Σ over components (bias included): equals the model's own value up to float rounding."""
        return self.values.sum(0)

    def check(self) -> float:
        """``max |total − model value| / max |model value|`` over prompts, positions and targets."""
        err = (self.total() - self.model_values).abs().max()
        return float(err / self.model_values.abs().max().clamp_min(1e-12))

    def mean(self) -> pd.DataFrame:
        """Per component (and position index, target index): mean over prompts, standard error, n."""
        df = self.to_dataframe()
        keys = ["component", "kind", "layer", "head", "neuron", "sel", "target_index"]
        g = df.groupby(keys, sort=False, dropna=False)["value"]
        out = g.agg(["mean", "sem", "count"]).reset_index().rename(columns={"count": "n"})
        out["sem"] = out["sem"].fillna(0.0)
        return out

    # -------------------------------------------------------------- tables
    def _target_label(self, i: int, j: int, t: int) -> str:
        if self.target_kind == "direction":
            return "direction"
        if self.target_kind == "vocab":
            return self.target_names.get(t, str(t))
        tid = int(self.target_ids[i, j, t])
        name = self.target_names.get(tid, str(tid))
        if self.contrast_ids is not None:
            cid = int(self.contrast_ids[i, j, t])
            return f"{name} - {self.target_names.get(cid, str(cid))}"
        return name

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy: one row per component, prompt, position and target.

        Columns: ``component``, ``kind`` (embed/attn/mlp/head/neuron/bias), ``layer``, ``head``,
        ``neuron``, ``prompt``, ``sel`` (index into the chosen positions), ``position`` (absolute
        token position), ``target_index``, ``target``, ``value`` (exact contribution),
        ``ablated_logit_renormed``, ``direct_effect_renormed`` and ``model_value``. With
        ``unit="source"`` also ``source`` (the position a head read) and ``source_token``, one row per
        (prompt, position, target, layer, head, source) the query can read (sources after the query
        or in the padding are left out).
        """
        C, n, s, k = self.values.shape
        idx = torch.cartesian_prod(*(torch.arange(d) for d in (C, n, s, k))).reshape(-1, 4)
        c, i, j, t = (idx[:, q] for q in range(4))
        names = [self._target_label(a, b, d) for a in range(n) for b in range(s) for d in range(k)]
        model = self.model_values.reshape(-1).repeat(C)
        abl = self.ablated_renormed.reshape(-1)
        df = pd.DataFrame({
            "component": [self.components[q].label for q in c.tolist()],
            "kind": [self.components[q].kind for q in c.tolist()],
            "layer": pd.array([self.components[q].layer for q in c.tolist()], dtype="Int64"),
            "head": pd.array([self.components[q].head for q in c.tolist()], dtype="Int64"),
            "neuron": pd.array([self.components[q].neuron for q in c.tolist()], dtype="Int64"),
            "prompt": i.numpy(), "sel": j.numpy(), "position": self.positions[i, j].numpy(),
            "target_index": t.numpy(), "target": names * C,
            "value": self.values.reshape(-1).numpy(),
            "ablated_logit_renormed": abl.numpy(),
            "direct_effect_renormed": (model - abl).numpy(),
            "model_value": model.numpy(),
        })
        if any(comp.expert is not None for comp in self.components):
            df.insert(5, "expert", pd.array([self.components[q].expert for q in c.tolist()], dtype="Int64"))
        if self.unit == "source":
            src = torch.tensor([-1 if q.source is None else q.source for q in self.components])[c]
            valid = source_valid(self.positions, [len(t) for t in self.str_tokens], int(src.max()) + 1, self.causal)
            keep = (src < 0) | valid[i, j, src.clamp_min(0)]
            df.insert(4, "source", pd.array([None if q < 0 else q for q in src.tolist()], dtype="Int64"))
            df.insert(5, "source_token", [self.str_tokens[a][q] if 0 <= q < len(self.str_tokens[a]) else None
                                          for a, q in zip(i.tolist(), src.tolist())])
            df = df[keep.numpy()].reset_index(drop=True)
        if self.capped_values is not None:  # the soft-capped logit the model outputs, beside the pre-cap one
            df["model_value_capped"] = self.capped_values.reshape(-1).repeat(C).numpy()
        return df

    def plot(self):
        """Bars per component; layer × position heatmap for several positions; layer × head grid for heads."""
        if self.unit == "source":
            from streamlens.present.attention import source_figure

            return source_figure(self)
        from streamlens.present import figures

        return figures.decomposition_figure(self)

    def metadata(self) -> dict[str, Any]:
        return {"model": self.model_name, "unit": self.unit, "target": self.target_kind, "check": self.check(),
                "note": self.note}

    def describe(self) -> str:
        return (f"of {self.model_name} ({self.unit}, {self.target_kind}): {self.values.shape[1]} prompts, "
                f"check {fmt(self.check())}. {self.note}")

    def html_table(self) -> pd.DataFrame:
        m = self.mean()
        return m.reindex(m["mean"].abs().sort_values(ascending=False).index).head(20)

    def __repr__(self) -> str:
        C, n, s, k = self.values.shape
        return (f"LogitDecomposition({self.model_name!r}, unit={self.unit!r}, target={self.target_kind!r}, "
                f"components={C}, prompts={n}, positions={s}, targets={k}, check={self.check():.1e})")


# ---------------------------------------------------------------------------- one batch
def _apply(u_rows, ys: Tensor, shared: bool) -> Tensor:
    """``u · y`` for ys ``(c, b, s, d)``: u ``(b, s, k, d)`` per position or ``(k, d)`` shared."""
    return torch.einsum("cbsd,kd->cbsk", ys, u_rows) if shared else torch.einsum("cbsd,bskd->cbsk", ys, u_rows)


def _decompose_batch(model, batch, pos_idx, tgt: Target, unit, neuron_layers, chunk_size) -> BatchDecomposition:
    a, norm = model.arch, model.final_norm
    writers, glob, acts, logits = batch_writers(model, batch, pos_idx, unit, neuron_layers)
    ids, con = readout(model, tgt, logits)
    x = glob["final_in"]  # (b, s, d)
    scale = norm.scale(x)  # (b, s, 1): frozen at this input's value
    writes = torch.stack([w for _, w in writers])  # (C, b, s, d)
    ys = torch.cat([norm.linear_part(writes, scale), norm.bias_part(x)[None]])  # (C+1, b, s, d)
    renormed = norm(x[None] - writes)  # (C, b, s, d): the final norm recomputed without each writer
    b, s = pos_idx.shape
    k = a.d_vocab if tgt.kind == "vocab" else 1 if tgt.kind == "direction" else ids.shape[-1]
    vals = torch.empty(len(writers) + 1, b, s, k)
    abl = torch.full((len(writers) + 1, b, s, k), float("nan"))
    u_last = None
    for sl, u, c, shared in readouts(model, tgt, ids, con, chunk_size):
        cb = c.expand(b, s, -1) if shared else c  # (b, s, k)
        vals[..., sl] = _apply(u, ys, shared).cpu()
        vals[-1, ..., sl] += cb.cpu()
        abl[:-1, ..., sl] = (_apply(u, renormed, shared) + cb).cpu()
        u_last = (u.expand(b, s, -1, -1) if shared else u), cb
    capped = None
    if a.logit_softcap is not None:  # contributions add up to the pre-cap logit; the capped one is reported beside it
        capped, logits = logits, glob["unembed_out"] * a.logit_scale
    if tgt.kind == "direction":
        model_vals = (glob["final_out"].float() @ tgt.direction.to(x.device))[..., None]
        capped = None
    elif tgt.kind == "vocab":
        model_vals = logits
    else:
        model_vals = pick_logits(logits, ids, con)
        capped = None if capped is None else pick_logits(capped, ids, con)
    part = BatchDecomposition([c for c, _ in writers] + [BIAS], [w for _, w in writers], vals, abl,
                              model_vals.cpu(), ids, con, final_in=x,
                              capped_values=None if capped is None else capped.float().cpu())
    for l in neuron_layers:  # neuron n's write is act_n W[n]; its value act_n / s · (g ⊙ C W[n]) · u
        part.readout = u_last
        part.neuron_acts[l] = acts[l]
        part.neuron_values[l] = neuron_values(model, l, acts[l], part.writes[part.index(f"mlp.{l}")], scale, u_last[0])
    return part


# ---------------------------------------------------------------------------- the verb
@recorded
def decompose(
    model: Model | Any,
    inputs: Inputs,
    target: Any,
    *,
    contrast: Any = None,
    unit: str = "layer",
    positions: Positions = -1,
    layers: int | Sequence[int] | None = None,
    neurons: int = 10,
    batch_size: int = 16,
    chunk_size: int = 4096,
    progress: bool = True,
    position: Positions = None,
    prepend_bos: bool | None = None,
) -> LogitDecomposition:
    """Split the model's logit for ``target`` exactly into one contribution per residual-stream writer.

    Args:
        model: a :class:`~streamlens.Model` (or anything :func:`streamlens.load` takes).
        inputs: a prompt, a list of prompts (a data set: processed ``batch_size`` at a time), or token ids.
        target: a token (string of exactly one token, or id); a list with one per prompt; ``"top:K"``
            (the model's own top-K predictions at each position); ``"vocab"`` (every token, computed
            ``chunk_size`` tokens at a time); or a float tensor ``u`` of shape ``(d_model,)``, whose
            value is ``u · ln_final(x)`` (the final norm's output, the vector the unembedding reads).
        contrast: a token (or one per prompt): decompose the logit difference ``target − contrast``.
        unit: ``"layer"``, ``"head"`` (per attention head plus the output bias), ``"neuron"``,
            ``"source"`` (per attention head and source position it read, ``head.l.h@k``) or ``"expert"``
            (per routed expert of each mixture-of-experts block, plus ``mlp_rest``: shared experts).
        positions: which token(s) to read out at (the vocabulary of
            :func:`streamlens.stream.inputs.select_positions`; default ``-1``, the last real token
            of every prompt). Every prompt needs the same number of positions: ints, ``"last"`` or
            a slice within the shortest prompt.
        layers: for ``unit="neuron"``, the MLP layers to split into neurons (default all).
        neurons: for ``unit="neuron"``, how many neurons per layer (largest mean |contribution|).
        batch_size: prompts per forward pass.
        chunk_size: vocabulary rows per step for ``target="vocab"``.
        progress: show a progress bar over batches.
        prepend_bos: put the tokenizer's BOS token in front of each text (None, the default: when it
            has one; see :mod:`streamlens.stream.inputs`); recorded in the result.
        position: the former name of ``positions`` (deprecated).

    Returns:
        A :class:`LogitDecomposition`; ``dec.check()`` is the relative gap between the sum of
        contributions and the model's own value (≤ 1e-4 in float32).
    """
    from tqdm.auto import tqdm

    if position is not None:
        warnings.warn("decompose(position=...) is now positions=...", DeprecationWarning, stacklevel=2)
        positions = position
    model = as_model(model)
    require_linear_readout(model, "decompose")
    if unit not in UNITS:
        raise StreamlensError(f"unknown unit {unit!r}; choose from {UNITS}")
    if positions is None:
        raise StreamlensError("positions=None (every position) is not available for decompose: choose ints, 'last' "
                              "or a slice (e.g. -1 for the last token)")
    items = as_sequences(inputs)
    chunks = list(batches(items, batch_size))
    tgt = resolve(model, target, contrast, len(items))
    neuron_layers: tuple[int, ...] = ()
    if unit == "source":
        check_source_target(tgt)
    if unit == "neuron":
        if tgt.kind == "vocab":
            raise StreamlensError("unit='neuron' with target='vocab' would need d_vocab × d_mlp values per position; "
                                  "choose tokens, 'top:K' or a direction")
        if model.arch.extra_norms:
            raise UnsupportedModelError(f"unit='neuron': {model.name} normalises each MLP write (sandwich layout), "
                                        "so neuron writes do not add up to the residual update")
        if not isinstance(neurons, int) or neurons < 1:
            raise StreamlensError(f"neurons must be a positive int, got {neurons!r}")
        neuron_layers = model.check_layers(layers)
    elif layers is not None:
        raise StreamlensError(f"layers= chooses MLP layers for unit='neuron'; with unit={unit!r} every layer is included")
    parts, pos_all, str_tokens = [], [], []
    for start, chunk in tqdm(chunks, desc="decompose", unit="batch", disable=not progress):
        batch = encode(model, chunk, prepend_bos=prepend_bos)
        pos_idx, valid = select_positions(batch, positions)
        if not bool(valid.all()):
            raise StreamlensError(f"positions {positions!r} selects a different number of real tokens per prompt; "
                                  "decompose needs the same number for every prompt (use ints or 'last')")
        tgt_b = tgt.take(start, start + len(batch))
        if unit == "source":  # the head batch, with each head's read recorded and split by source position
            reader = AttentionReader(model, tuple(batch.input_ids.shape), pos_idx, range(model.arch.n_layers))
            with hooks.attached(reader.hooks()):
                parts.append(_decompose_batch(model, batch, pos_idx, tgt_b, "head", (), chunk_size))
            split_by_source(model, parts[-1], reader, tgt_b, chunk_size)
        else:
            parts.append(_decompose_batch(model, batch, pos_idx, tgt_b, unit, neuron_layers, chunk_size))
        pos_all.append(pos_idx)
        str_tokens += batch.str_tokens
    if neuron_layers:
        split_neurons(model, parts, neuron_layers, neurons)
    if unit == "source":
        pad_sources(model, parts)
    ids = None if parts[0].ids is None else torch.cat([p.ids.cpu() for p in parts])
    con = None if parts[0].contrast is None else torch.cat([p.contrast.cpu() for p in parts])
    used = sorted(set(range(model.arch.d_vocab) if tgt.kind == "vocab" else
                      [] if ids is None else ids.unique().tolist() + ([] if con is None else con.unique().tolist())))
    names = {}
    if model.tokenizer is not None and used:
        names = dict(zip(used, model.tokenizer.convert_ids_to_tokens(used) if tgt.kind == "vocab"
                         else [model.tokenizer.decode([i]) for i in used]))
    note = ("exact: contributions at the final norm's frozen scale sum to the model's own value; "
            "ablated_logit_renormed recomputes the norm without the component (not additive)")
    if unit == "source":
        note += "; each head split by the source its values were read at (" + NOTE_QK + ")"
    a = model.arch
    capped = None
    if a.logit_softcap is not None and parts[0].capped_values is not None:
        capped = torch.cat([p.capped_values for p in parts])
        gap = float((capped - torch.cat([p.model_values for p in parts])).abs().max())
        note += (f"; the model soft-caps its logits ({a.readout}): the contributions add up to the logit before the cap, "
                 f"the capped logit is model_value_capped (the cap changes these values by up to {gap:.3g})")
    elif a.logit_softcap is not None:
        note += f"; the model soft-caps its logits ({a.readout}): the values are before the cap"
    if a.logit_scale != 1.0:
        note += f"; the logit scale {a.logit_scale:g} is folded into the unembedding"
    return LogitDecomposition(
        model_name=model.name, unit=unit, target_kind=tgt.kind, components=tuple(parts[0].components),
        values=torch.cat([p.values for p in parts], dim=1), ablated_renormed=torch.cat([p.ablated for p in parts], dim=1),
        model_values=torch.cat([p.model_values for p in parts]), positions=torch.cat(pos_all),
        target_ids=ids, contrast_ids=con, target_names=names, note=note, capped_values=capped,
        str_tokens=tuple(str_tokens) if unit == "source" else (), causal=model.arch.causal,
    )
