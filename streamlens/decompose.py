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
``mlp_rest.l``, the rest of that layer's write: other neurons and the down projection's bias).

Post-norm models (BERT) are refused: every block renormalises, so the final residual is not a sum of
writes, and BERT's head applies a dense layer and GELU before its norm, so no per-writer split of the
logits is exact; streamlens raises rather than return a number that does not add up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from streamlens import hooks
from streamlens.capture import SUBLAYERS, _run_capture
from streamlens.hooks import select_positions_of
from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.inputs import Inputs, encode, select_positions
from streamlens.model import Model, as_model
from streamlens.targets import Target, prompt_batches, readout, require_unembed_path, resolve, vocab_chunks

UNITS = ("layer", "head", "neuron")


# ---------------------------------------------------------------------------- neurons
def _down_proj(model: Model, layer: int) -> tuple[Tensor, Tensor, Any]:
    """``(W, b, hook)``: the MLP's down projection as an affine map ``out = act @ W + b`` measured on the module."""
    mlp = hooks.block_component(model.bridge, layer, "mlp")
    out = None if mlp is None else hooks._child(mlp, "out")
    hp = hooks.hook_point(out, "in")
    if out is None or hp is None or not hasattr(out, "original_component"):
        raise UnsupportedModelError(f"layer {layer}'s MLP has no down projection (mlp.out) to split into neurons")
    lin = out.original_component
    p = next(lin.parameters())
    width = int(getattr(lin, "in_features", 0) or model.arch.d_mlp)
    with torch.no_grad():
        b = lin(torch.zeros(1, width, device=p.device, dtype=p.dtype)).float()[0]
        w = lin(torch.eye(width, device=p.device, dtype=p.dtype)).float() - b
    return w, b, hp


# ---------------------------------------------------------------------------- the result
@dataclass(frozen=True, eq=False)
class LogitDecomposition:
    """Per-writer contributions to a target's logit, for every prompt, position and target token.

    ``values[c, i, j, t]`` is component ``labels[c]``'s contribution at prompt ``i``, position
    ``positions[i, j]``, target ``t``; the last component is ``"bias"``. ``values.sum(0)`` equals
    ``model_values`` (the model's own logit, logit difference, or direction · final-norm output).
    """

    model_name: str
    unit: str
    target_kind: str
    labels: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    neurons: tuple[int | None, ...]
    values: Float[Tensor, "component prompt sel target"] = field(repr=False)
    ablated_renormed: Float[Tensor, "component prompt sel target"] = field(repr=False)
    model_values: Float[Tensor, "prompt sel target"] = field(repr=False)
    positions: Int[Tensor, "prompt sel"] = field(repr=False)
    target_ids: Int[Tensor, "prompt sel target"] | None = field(repr=False)
    contrast_ids: Int[Tensor, "prompt sel target"] | None = field(repr=False)
    target_names: dict[int, str] = field(repr=False, default_factory=dict)
    note: str = ""

    def __post_init__(self):
        n = len(self.labels)
        if not (len(self.kinds) == len(self.layers) == len(self.heads) == len(self.neurons) == n == self.values.shape[0]):
            raise StreamlensError(f"{n} labels for {self.values.shape[0]} components: the decomposition is inconsistent")
        if self.values.shape != self.ablated_renormed.shape or self.values.shape[1:] != self.model_values.shape:
            raise StreamlensError("values, ablated_renormed and model_values differ in shape")

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
        ``ablated_logit_renormed``, ``direct_effect_renormed`` and ``model_value``.
        """
        C, n, s, k = self.values.shape
        idx = torch.cartesian_prod(*(torch.arange(d) for d in (C, n, s, k))).reshape(-1, 4)
        c, i, j, t = (idx[:, q] for q in range(4))
        names = [self._target_label(a, b, d) for a in range(n) for b in range(s) for d in range(k)]
        model = self.model_values.reshape(-1).repeat(C)
        abl = self.ablated_renormed.reshape(-1)
        df = pd.DataFrame({
            "component": [self.labels[q] for q in c.tolist()],
            "kind": [self.kinds[q] for q in c.tolist()],
            "layer": pd.array([self.layers[q] for q in c.tolist()], dtype="Int64"),
            "head": pd.array([self.heads[q] for q in c.tolist()], dtype="Int64"),
            "neuron": pd.array([self.neurons[q] for q in c.tolist()], dtype="Int64"),
            "prompt": i.numpy(), "sel": j.numpy(), "position": self.positions[i, j].numpy(),
            "target_index": t.numpy(), "target": names * C,
            "value": self.values.reshape(-1).numpy(),
            "ablated_logit_renormed": abl.numpy(),
            "direct_effect_renormed": (model - abl).numpy(),
            "model_value": model.numpy(),
        })
        return df

    def plot(self):
        """Bars per component; layer × position heatmap for several positions; layer × head grid for heads."""
        from streamlens import plots_decompose

        return plots_decompose.decomposition_figure(self)

    def save(self, path: str | Path) -> Path:
        """The tidy table as ``.csv`` or ``.json`` (records), by extension."""
        path = Path(path)
        if path.suffix not in (".csv", ".json"):
            raise StreamlensError(f"save path {str(path)!r}: use a .csv or .json extension")
        df = self.to_dataframe()
        if path.suffix == ".json":
            df.to_json(path, orient="records", indent=2)
        else:
            df.to_csv(path, index=False)
        return path

    def __repr__(self) -> str:
        C, n, s, k = self.values.shape
        return (f"LogitDecomposition({self.model_name!r}, unit={self.unit!r}, target={self.target_kind!r}, "
                f"components={C}, prompts={n}, positions={s}, targets={k}, check={self.check():.1e})")

    def _repr_html_(self) -> str:
        m = self.mean()
        top = m.reindex(m["mean"].abs().sort_values(ascending=False).index).head(20)
        return (f"<b>LogitDecomposition</b> of <code>{self.model_name}</code> ({self.unit}, {self.target_kind}): "
                f"{self.values.shape[1]} prompts, check {self.check():.1e}<br>{self.note}"
                + top.to_html(index=False, float_format=lambda v: f"{v:.4g}"))


# ---------------------------------------------------------------------------- one batch
def _contribs(model: Model, batch, pos_idx, unit: str, neuron_layers: Sequence[int]):
    """Run one batch; return the writes ``[(label, kind, layer, head, (b, s, d))]``, the globals and MLP activations."""
    a = model.arch
    comps: list[tuple] = []
    glob: dict[str, Tensor] = {}
    acts: dict[int, Tensor] = {}
    b, p = batch.input_ids.shape
    bidx, pidx = torch.arange(b)[:, None].to(model.device), pos_idx.to(model.device)

    def on_layer(layer, named):
        if layer == 0:
            glob["resid_pre0"] = named["resid_pre"]
        if unit == "head":
            for h in range(a.n_heads):
                comps.append((f"head.{layer}.{h}", "head", layer, h, named["head_out"][:, :, h]))
            comps.append((f"attn_bias.{layer}", "bias", layer, None, named["attn_bias_out"]))
        else:
            comps.append((f"attn.{layer}", "attn", layer, None, named["attn_out"]))
        comps.append((f"mlp.{layer}", "mlp", layer, None, named["mlp_out"]))

    def on_global(name, t):
        glob[name] = t

    extra = []
    for l in neuron_layers:
        hp = _down_proj(model, l)[2]

        def grab(t, l=l):
            acts[l] = select_positions_of(t, (b, p), bidx, pidx).float()

        extra.append((hp, grab))
    with hooks.attached(extra):
        logits = _run_capture(model, batch, pos_idx, layers=range(a.n_layers), sublayers=SUBLAYERS,
                              heads=unit == "head", store=lambda t: t.float(), on_layer=on_layer,
                              on_global=on_global)
    if a.embed_is_sum and "embed" in glob:
        emb = [("embed", "embed", None, None, glob["embed"])]
        if a.has_pos_embed and "pos_embed" in glob:
            emb.append(("pos_embed", "embed", None, None, glob["pos_embed"]))
    else:  # whatever enters block 0 (e.g. a scaled or projected embedding) is one writer
        emb = [("embed", "embed", None, None, glob["resid_pre0"])]
    return emb + comps, glob, acts, logits.float()


def _apply(u_rows, ys: Tensor, shared: bool) -> Tensor:
    """``u · y`` for ys ``(c, b, s, d)``: u ``(b, s, k, d)`` per position or ``(k, d)`` shared."""
    return torch.einsum("cbsd,kd->cbsk", ys, u_rows) if shared else torch.einsum("cbsd,bskd->cbsk", ys, u_rows)


def _readouts(model: Model, tgt: Target, ids, con, chunk_size: int):
    """Yield ``(slice over targets, u, c, shared)`` covering every target; the vocabulary in chunks."""
    W, bU = model.unembed_weight()
    W = W.float()
    bU = torch.zeros(W.shape[0], device=W.device) if bU is None else bU.float()
    if tgt.kind == "direction":
        yield slice(0, 1), tgt.direction.to(W.device)[None], torch.zeros(1, device=W.device), True
    elif tgt.kind == "vocab":
        for sl in vocab_chunks(W.shape[0], chunk_size):
            yield sl, W[sl], bU[sl], True
    else:
        ids = ids.to(W.device)
        u, c = W[ids], bU[ids]
        if con is not None:
            con = con.to(W.device)
            u, c = u - W[con], c - bU[con]
        yield slice(0, ids.shape[-1]), u, c, False


def _decompose_batch(model, batch, pos_idx, tgt: Target, unit, neuron_layers, chunk_size) -> dict:
    a, norm = model.arch, model.final_norm
    comps, glob, acts, logits = _contribs(model, batch, pos_idx, unit, neuron_layers)
    ids, con = readout(model, tgt, logits)
    x = glob["final_in"]  # (b, s, d)
    scale = norm.scale(x)  # (b, s, 1): frozen at this input's value
    writes = torch.stack([c[4] for c in comps])  # (C, b, s, d)
    ys = torch.cat([norm.linear_part(writes, scale), norm.bias_part(x)[None]])  # (C+1, b, s, d)
    renormed = norm(x[None] - writes)  # (C, b, s, d): the final norm recomputed without each writer
    b, s = pos_idx.shape
    k = a.d_vocab if tgt.kind == "vocab" else 1 if tgt.kind == "direction" else ids.shape[-1]
    vals = torch.empty(len(comps) + 1, b, s, k)
    abl = torch.full((len(comps) + 1, b, s, k), float("nan"))
    out: dict[str, Any] = {}
    for sl, u, c, shared in _readouts(model, tgt, ids, con, chunk_size):
        cb = c.expand(b, s, -1) if shared else c  # (b, s, k)
        vals[..., sl] = _apply(u, ys, shared).cpu()
        vals[-1, ..., sl] += cb.cpu()
        abl[:-1, ..., sl] = (_apply(u, renormed, shared) + cb).cpu()
        if neuron_layers:
            out["u"], out["c"] = (u.expand(b, s, -1, -1) if shared else u), cb
    neuron = {}
    for l in neuron_layers:  # neuron n's write is act_n W[n]; its value act_n / s · (g ⊙ C W[n]) · u
        w, b_down, _ = _down_proj(model, l)
        mlp = next(c[4] for c in comps if c[0] == f"mlp.{l}")
        err = ((acts[l] @ w + b_down - mlp).norm() / mlp.norm().clamp_min(1e-12)).item()
        if err > 1e-4:
            raise UnsupportedModelError(
                f"layer {l}: the down projection's input (the neuron activations) times its weights does not give the "
                f"MLP write (relative error {err:.1e}), so neuron contributions would not add up"
            )
        wn = norm.linear_part(w, torch.ones((), device=w.device))  # (d_mlp, d): g ⊙ C W
        proj = torch.einsum("nd,bskd->bskn", wn, out["u"])
        neuron[l] = (acts[l][:, :, None, :] / scale[..., None] * proj).cpu()  # (b, s, k, d_mlp)
        out[f"acts{l}"], out[f"w{l}"], out[f"mlp{l}"] = acts[l], w, mlp
    if tgt.kind == "direction":
        model_vals = (glob["final_out"].float() @ tgt.direction.to(x.device))[..., None]
    elif tgt.kind == "vocab":
        model_vals = logits
    else:
        model_vals = logits.gather(-1, ids.to(logits.device))
        if con is not None:
            model_vals = model_vals - logits.gather(-1, con.to(logits.device))
    out.update(comps=[c[:4] for c in comps], vals=vals, abl=abl, model=model_vals.cpu(), ids=ids, con=con,
               neuron=neuron, x=x)
    return out


def _split_neurons(model: Model, outs: list[dict], layers: Sequence[int], top: int) -> None:
    """Replace ``mlp.l`` by its ``top`` largest neurons (by mean |value| over every batch) and ``mlp_rest.l``."""
    norm = model.final_norm
    for l in layers:
        score = torch.cat([o["neuron"][l].abs().flatten(0, 2) for o in outs]).mean(0)  # (d_mlp,)
        idx = score.topk(min(top, score.numel())).indices.sort().values
        for o in outs:
            c = [q[0] for q in o["comps"]].index(f"mlp.{l}")
            nv = o["neuron"][l][..., idx].permute(3, 0, 1, 2)  # (top, b, s, k)
            rest = o["vals"][c] - nv.sum(0)
            act, w, x, u, cb = o[f"acts{l}"], o[f"w{l}"], o["x"], o["u"], o["c"]
            nw = act[..., idx].permute(2, 0, 1)[..., None] * w[idx][:, None, None]  # (top, b, s, d): each neuron's write
            rw = o[f"mlp{l}"] - nw.sum(0)
            renorm = norm(x[None] - torch.cat([nw, rw[None]]))  # (top+1, b, s, d)
            abl = (torch.einsum("nbsd,bskd->nbsk", renorm, u) + cb).cpu()
            new = [(f"neuron.{l}.{int(n)}", "neuron", l, None, int(n)) for n in idx] + \
                  [(f"mlp_rest.{l}", "mlp", l, None, None)]
            o["comps"] = o["comps"][:c] + new + o["comps"][c + 1:]
            o["vals"] = torch.cat([o["vals"][:c], nv, rest[None], o["vals"][c + 1:]])
            o["abl"] = torch.cat([o["abl"][:c], abl, o["abl"][c + 1:]])


# ---------------------------------------------------------------------------- the verb
def decompose(
    model: Model | Any,
    inputs: Inputs,
    target: Any,
    *,
    contrast: Any = None,
    unit: str = "layer",
    position: int | Sequence[int] = -1,
    layers: int | Sequence[int] | None = None,
    neurons: int = 10,
    batch_size: int = 16,
    chunk_size: int = 4096,
    progress: bool = True,
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
        unit: ``"layer"``, ``"head"`` (per attention head plus the output bias) or ``"neuron"``.
        position: which token(s) to read out at: ints, negative ones counting back from each prompt's
            last real token (default ``-1``, the last non-padding token of every prompt).
        layers: for ``unit="neuron"``, the MLP layers to split into neurons (default all).
        neurons: for ``unit="neuron"``, how many neurons per layer (largest mean |contribution|).
        batch_size: prompts per forward pass.
        chunk_size: vocabulary rows per step for ``target="vocab"``.
        progress: show a progress bar over batches.

    Returns:
        A :class:`LogitDecomposition`; ``dec.check()`` is the relative gap between the sum of
        contributions and the model's own value (≤ 1e-4 in float32).
    """
    from tqdm.auto import tqdm

    model = as_model(model)
    require_unembed_path(model, "decompose")
    if unit not in UNITS:
        raise StreamlensError(f"unknown unit {unit!r}; choose from {UNITS}")
    if isinstance(position, str) or position is None:
        raise StreamlensError(f"position must be an int or a list of ints (e.g. -1 for the last token), got {position!r}")
    n, chunks = prompt_batches(inputs, batch_size)
    tgt = resolve(model, target, contrast, n)
    neuron_layers: tuple[int, ...] = ()
    if unit == "neuron":
        if tgt.kind == "vocab":
            raise StreamlensError("unit='neuron' with target='vocab' would need d_vocab × d_mlp values per position; "
                                  "choose tokens, 'top:K' or a direction")
        if model.arch.layout == "sandwich":
            raise UnsupportedModelError(f"unit='neuron': {model.name} normalises each MLP write (sandwich layout), "
                                        "so neuron writes do not add up to the residual update")
        if not isinstance(neurons, int) or neurons < 1:
            raise StreamlensError(f"neurons must be a positive int, got {neurons!r}")
        neuron_layers = model.check_layers(layers)
    elif layers is not None:
        raise StreamlensError(f"layers= chooses MLP layers for unit='neuron'; with unit={unit!r} every layer is included")
    outs, pos_all = [], []
    for start, chunk in tqdm(chunks, desc="decompose", unit="batch", disable=not progress):
        batch = encode(model, chunk)
        pos_idx, _ = select_positions(batch, position)
        outs.append(_decompose_batch(model, batch, pos_idx, tgt.take(start, start + len(batch)), unit,
                                     neuron_layers, chunk_size))
        pos_all.append(pos_idx)
    if neuron_layers:
        _split_neurons(model, outs, neuron_layers, neurons)
    comps = [q if len(q) == 5 else (*q, None) for q in outs[0]["comps"]] + [("bias", "bias", None, None, None)]
    cat = lambda key: torch.cat([o[key] for o in outs], dim=1)  # noqa: E731
    ids = None if outs[0]["ids"] is None else torch.cat([o["ids"].cpu() for o in outs])
    con = None if outs[0]["con"] is None else torch.cat([o["con"].cpu() for o in outs])
    used = sorted(set(range(model.arch.d_vocab) if tgt.kind == "vocab" else
                      [] if ids is None else ids.unique().tolist() + ([] if con is None else con.unique().tolist())))
    names = {}
    if model.tokenizer is not None and used:
        names = dict(zip(used, model.tokenizer.convert_ids_to_tokens(used) if tgt.kind == "vocab"
                         else [model.tokenizer.decode([i]) for i in used]))
    note = ("exact: contributions at the final norm's frozen scale sum to the model's own value; "
            "ablated_logit_renormed recomputes the norm without the component (not additive)")
    return LogitDecomposition(
        model_name=model.name, unit=unit, target_kind=tgt.kind,
        labels=tuple(q[0] for q in comps), kinds=tuple(q[1] for q in comps), layers=tuple(q[2] for q in comps),
        heads=tuple(q[3] for q in comps), neurons=tuple(q[4] for q in comps),
        values=cat("vals"), ablated_renormed=cat("abl"), model_values=torch.cat([o["model"] for o in outs]),
        positions=torch.cat(pos_all), target_ids=ids, contrast_ids=con, target_names=names, note=note,
    )
