"""The gradient highway, measured: each layer's input gradient split into its skip and sub-layer paths.

A block with a residual connection computes ``resid_post = resid_pre + f(resid_pre)``, where ``f``
is everything the block adds (both sub-layers, including the attn → mlp path of a sequential
block). By the chain rule, with ``g_post = ∂L/∂resid_post``,

    ∂L/∂resid_pre = g_post            (identity path: the skip connection)
                  + g_post · J_f      (through the sub-layers; J_f = ∂f/∂resid_pre)

so the gradient always keeps an unattenuated copy of ``g_post``, whatever ``f`` does. streamlens
computes the three terms with autograd and checks the split rather than assuming it:

* ``full`` = ``∂L/∂resid_pre`` and ``g_post`` come from one backward pass of ``L``;
* ``sublayer`` is the vector-Jacobian product ``∂/∂resid_pre [(resid_post − resid_pre) · g_post]``
  with ``g_post`` held constant: the block's update differentiated alone;
* ``identity`` is ``g_post``, and ``identity + sublayer == full`` is a check, not a definition.

With the skip connection removed at layer ``l`` (``drop_residual``), the block computes
``resid_post = f(resid_pre)``: the identity part is zero and the sub-layer part is
``∂/∂resid_pre [resid_post · g_post]``.

Post-norm blocks (BERT) have no identity path (the skip passes through the norm:
``resid_post = ln(resid_pre + f(resid_pre))``), so they are refused.

Only activations are differentiated (``torch.autograd.grad`` with activation inputs), so the
model's parameters never receive ``.grad`` and their ``requires_grad`` flags are never touched.

Example:
    >>> split = streamlens.gradient_split(model, ["The cat sat on the mat"])
    >>> split.split_error()        # max ‖identity + sublayer − full‖ / max ‖full‖, ~1e-7 in float32
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.intervene.removal import drop_residual_hooks
from streamlens.model import hooks
from streamlens.model.loading import Model, as_model
from streamlens.model.precision import up
from streamlens.present.results import Result, fmt
from streamlens.stream.inputs import Batch, Inputs, encode, recorded


def check_gradient_model(model: Model) -> None:
    """Refuse models whose blocks have no identity path."""
    if not model.arch.rule.additive:
        raise UnsupportedModelError(
            f"{model.name} is a post-norm model (layout 'post'): its skip connection passes through the norm "
            "(resid_post = ln(resid_pre + f(resid_pre))), so there is no identity path to split off; "
            "use gradients=False for the forward statistics only"
        )


def check_drop(model: Model, drop_residual: int | Sequence[int] | None) -> tuple[int, ...]:
    """The layers whose skip connection is removed (``x + f(x) → f(x)``), checked against the model."""
    if drop_residual is None:
        return ()
    layers = model.check_layers(drop_residual)
    if not model.arch.rule.additive:
        raise UnsupportedModelError(
            f"drop_residual={list(layers)}: {model.name} is a post-norm model (layout 'post'), whose skip connection "
            "passes through the norm, so it cannot be removed as resid_post − resid_pre; only pre-norm, parallel and "
            "sandwich blocks (resid_post = resid_pre + f(resid_pre)) can drop it"
        )
    return layers


def stream_hooks(model: Model, drop: Sequence[int], pre: dict[int, Tensor], post: dict[int, Tensor]) -> list:
    """Hooks recording every block's input (``pre``) and output (``post``), with the skip removed at ``drop``.

    Block 0's input becomes a fresh leaf that requires grad, so the whole stream is differentiable
    without touching any parameter's ``requires_grad``. The removal is :mod:`streamlens.intervene`'s
    own (``x + f(x) → f(x)``); it runs between the recording of a block's input and of its output, so
    ``post`` holds what the next block really reads.
    """
    ins, outs = [], []
    for l in range(model.arch.n_layers):
        hp_in = hooks.block_point(model.bridge, l, "block", "in")
        hp_out = hooks.block_point(model.bridge, l, "block", "out")
        if hp_in is None or hp_out is None:
            raise StreamlensError(f"block {l} of {model.name} has no hook_in/hook_out point, which this analysis needs")

        def on_in(t: Tensor, l=l) -> Tensor:
            if l == 0:
                t = t.detach().requires_grad_(True)
            pre[l] = t
            return t

        ins.append((hp_in, on_in))
        outs.append((hp_out, lambda t, l=l: post.__setitem__(l, t)))
    return ins + drop_residual_hooks(model, drop) + outs


def loss_positions(batch: Batch, target: int | None) -> Bool[Tensor, "batch pos"]:
    """The positions whose gradient statistics count: with a next real token (``target=None``), or every real token."""
    if target is not None:
        return batch.mask.clone()
    counted = torch.zeros_like(batch.mask)
    counted[:, :-1] = batch.mask[:, :-1] & batch.mask[:, 1:]
    return counted


def loss_and_mask(logits: Float[Tensor, "batch pos vocab"], batch: Batch, target: int | None
                  ) -> tuple[Tensor, Bool[Tensor, "batch pos"]]:
    """The scalar loss and the positions whose gradient statistics count.

    ``target=None``: next-token cross-entropy, ``L = Σ_docs mean_t CE(logits[t], ids[t+1])`` over the
    real positions ``t`` that have a real next token (each document's own mean, so a document's
    gradients do not depend on what it is batched with); counted positions: those ``t``.
    ``target=k``: ``L = Σ_docs logits[last real position, k]``; counted positions: every real token.
    """
    ids, mask = batch.input_ids.to(logits.device), batch.mask.to(logits.device)
    b, p = ids.shape
    logits = logits.float()
    if target is None:
        valid = mask[:, :-1] & mask[:, 1:]  # (b, p-1): position t predicts token t+1
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(b, p - 1)
        per_doc = valid.sum(1).clamp_min(1)
        loss = (ce * valid / per_doc[:, None]).sum()
        counted = torch.zeros_like(mask)
        counted[:, :-1] = valid
        return loss, counted
    last = mask.sum(1) - 1
    return logits[torch.arange(b, device=logits.device), last, target].sum(), mask.clone()


@dataclass(frozen=True, eq=False)
class GradientSplit(Result):
    """Per-layer input gradients of one batch, split into identity and sub-layer paths.

    ``full[i]``, ``identity[i]`` and ``sublayer[i]`` have shape ``(batch, pos, d_model)`` and belong
    to layer ``layers[i]``; ``mask`` marks the positions that count (see :func:`loss_and_mask`).
    """

    layers: tuple[int, ...]
    full: Float[Tensor, "layer batch pos d_model"] = field(repr=False)
    identity: Float[Tensor, "layer batch pos d_model"] = field(repr=False)
    sublayer: Float[Tensor, "layer batch pos d_model"] = field(repr=False)
    mask: Bool[Tensor, "batch pos"] = field(repr=False)
    dropped: tuple[int, ...]
    loss: float
    #: ‖resid_pre‖ per layer and position ``(layer, batch, pos)``: the scale the gradient is measured against
    stream_norm: Tensor | None = field(default=None, repr=False)

    def split_error(self) -> float:
        """``max ‖identity + sublayer − full‖ / max ‖full‖`` over layers and counted positions."""
        m = self.mask.to(self.full.device)
        diff = (self.identity + self.sublayer - self.full).norm(dim=-1)[:, m]
        return float(diff.max() / self.full.norm(dim=-1)[:, m].max().clamp_min(1e-30))

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer: mean norms over the counted positions of the full gradient, its identity and
        sub-layer parts, their ratio, and whether the layer's skip connection was removed."""
        m = self.mask.to(self.full.device)
        rows = []
        for i, l in enumerate(self.layers):
            full, ident, sub = (t[i].norm(dim=-1)[m].double().mean().item() for t in (self.full, self.identity, self.sublayer))
            rows.append({"layer": l, "grad_full_norm": full, "grad_identity_norm": ident, "grad_sublayer_norm": sub,
                         "grad_sub_to_identity": sub / ident if ident > 0 else float("nan"), "dropped": l in self.dropped})
        return pd.DataFrame(rows)

    def plot(self):
        from streamlens.present import figures

        return figures.gradient_split_figure(self.to_dataframe(), title=f"Gradient split (loss {fmt(self.loss)})")

    def metadata(self) -> dict[str, Any]:
        return {"loss": self.loss, "dropped": list(self.dropped), "split_error": self.split_error()}

    def tensors(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "full": self.full, "identity": self.identity, "sublayer": self.sublayer,
                "mask": self.mask}

    def describe(self) -> str:
        b, p = self.mask.shape
        return (f"of {len(self.layers)} layers, batch {b} × {p} positions ({int(self.mask.sum())} counted), loss "
                f"{fmt(self.loss)}, dropped {list(self.dropped)}, split error {self.split_error():.1e}")

    def __repr__(self) -> str:
        return f"GradientSplit({self.describe()})"


def split_batch(model: Model, batch: Batch, *, target: int | None = None, drop: Sequence[int] = ()) -> GradientSplit:
    """One forward with grad enabled and the identity/sub-layer split of every layer's input gradient."""
    n = model.arch.n_layers
    pre: dict[int, Tensor] = {}
    post: dict[int, Tensor] = {}
    with torch.enable_grad(), hooks.attached(stream_hooks(model, drop, pre, post)):
        logits = model.run(batch.input_ids, batch.mask)
        loss, counted = loss_and_mask(logits, batch, target)
        if not bool(counted.any()):
            raise StreamlensError("no position in this batch has a loss (every input is a single token?)")
        missing = [l for l in range(n) if l not in pre or l not in post]
        if missing:
            raise StreamlensError(f"blocks {missing} of {model.name} did not run through their hook points")
        ins = [pre[l] for l in range(n)] + [post[l] for l in range(n)]
        grads = torch.autograd.grad(loss, ins, retain_graph=True)
        g_pre, g_post = grads[:n], grads[n:]
        subs = []
        for l in range(n):
            # the block's update alone, contracted with g_post held fixed: a vector-Jacobian product
            update = post[l] if l in drop else post[l] - pre[l]
            (g_sub,) = torch.autograd.grad((update * g_post[l].detach()).sum(), pre[l], retain_graph=True)
            subs.append(g_sub.detach())
    # half precision: autograd ran in the model's dtype; the parts are returned in float32 (exact casts)
    full = torch.stack([up(g.detach()) for g in g_pre])
    identity = torch.stack([torch.zeros_like(up(g)) if l in drop else up(g.detach()) for l, g in enumerate(g_post)])
    subs = [up(g) for g in subs]
    for l in range(n):  # a gradient that overflowed (float16) is an error, never a NaN in the table
        for what, t in (("full", full[l]), ("identity", identity[l]), ("sub-layer", subs[l])):
            if not bool(torch.isfinite(t).all()):
                raise StreamlensError(f"the {what} gradient at block {l}'s input of {model.name} is not finite "
                                      f"(NaN or inf) in {model.dtype}" + ("; float16 overflows: load it with "
                                      "dtype='bfloat16' or 'float32'" if model.dtype == torch.float16 else ""))
    norms = torch.stack([pre[l].detach().float().norm(dim=-1) for l in range(n)])  # (layer, batch, pos)
    return GradientSplit(tuple(range(n)), full, identity, torch.stack(subs), counted.cpu(), tuple(drop),
                         float(loss.detach()), norms)


@recorded
def gradient_split(model: Model | object, inputs: Inputs, *, target: int | None = None,
                   drop_residual: int | Sequence[int] | None = None, max_tokens: int | None = None,
                   prepend_bos: bool | None = None) -> GradientSplit:
    """Split ``∂L/∂resid_pre`` of every layer into its identity and sub-layer parts, for one batch.

    Args:
        model: a :class:`~streamlens.Model` (pre-norm, parallel or sandwich layout). In bfloat16/float16
            autograd runs in the model's dtype and the parts come back in float32; ``identity + sublayer ==
            full`` then holds to that dtype's rounding (the backward pass rounds their sum), not to float32's.
        inputs: a string, a list of strings (right-padded) or token ids.
        target: ``None`` for next-token cross-entropy, or a token id whose logit at each input's
            last real token is the loss.
        drop_residual: layers whose skip connection is removed (``x + f(x) → f(x)``).
        max_tokens: truncate each input to this many tokens.
        prepend_bos: put the tokenizer's BOS token in front of each text (None, the default: when it
            has one; see :mod:`streamlens.stream.inputs`); recorded in the result.
    """
    model = as_model(model)
    check_gradient_model(model)
    drop = check_drop(model, drop_residual)
    target = check_target(model, target)
    return split_batch(model, encode(model, inputs, max_tokens=max_tokens, prepend_bos=prepend_bos), target=target, drop=drop)


def check_target(model: Model, target) -> int | None:
    if target is None:
        return None
    if not isinstance(target, int) or isinstance(target, bool) or not 0 <= target < model.arch.d_vocab:
        raise StreamlensError(f"target must be None (next-token loss) or a token id in 0..{model.arch.d_vocab - 1}, "
                              f"got {target!r}")
    return target


def position_stats(split: GradientSplit) -> dict[str, Tensor]:
    """Per-layer, per-position gradient norms ``(layer, batch, pos)`` for the accumulators."""
    out = {"grad_full_norm": split.full.norm(dim=-1), "grad_identity_norm": split.identity.norm(dim=-1),
           "grad_sublayer_norm": split.sublayer.norm(dim=-1)}
    if split.stream_norm is not None:
        # ‖∂L/∂x‖·‖x‖: the gradient per unit of stream (the loss's response to a relative change of x), free of
        # the 1/‖x‖ that a norm's input gradient carries
        out["grad_stream_scaled"] = out["grad_full_norm"] * split.stream_norm.to(split.full.device)
    return out
