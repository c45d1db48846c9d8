"""The writers of one batch, as the decomposition sees them: one ``(Component, write)`` per writer.

The embedding (or whatever enters block 0), then per block its token mixer (attention, or the bridge's
``mixer`` / ``linear_attn`` / ``conv``; per head with ``unit="head"``) and its MLP (per routed expert
with ``unit="expert"``, :mod:`streamlens.readout.experts`), each in the stream's units. Soft-capped
models also hand over the pre-cap logits, which is what the contributions add up to.

Gemma 4 scales the whole stream at the end of each block (``resid_post = s_l · (...)``), so a write of
block ``l`` reaches the final residual multiplied by ``s_l · s_{l+1} · ... · s_{L-1}`` and the embedding
by the product of every scale (:meth:`streamlens.model.probe.Architecture.reach`). Each write handed
over here is already multiplied by that product: it is the writer's share of the *final* residual, so
the shares add up to it exactly. Its third writer, the per-layer-input write after the MLP, is ``ple.l``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from streamlens.errors import StreamlensError
from streamlens.model import experts, hooks
from streamlens.model.affine import down_projection
from streamlens.model.experts import moe_layers
from streamlens.model.loading import Model
from streamlens.readout.components import Component
from streamlens.readout.experts import expert_components
from streamlens.stream.engine import capture


def batch_writers(model: Model, batch, pos_idx, unit: str, neuron_layers: Sequence[int]):
    """Run one batch: ``[(Component, write (b, s, d))]``, the globals, the MLP activations and the logits."""
    a = model.arch
    writers: list[tuple[Component, Tensor]] = []
    glob: dict[str, Tensor] = {}
    acts: dict[int, Tensor] = {}
    b, p = batch.input_ids.shape
    bidx, pidx = torch.arange(b)[:, None].to(model.device), pos_idx.to(model.device)

    def on_layer(layer, named):
        if layer == 0:
            glob["resid_pre0"] = named["resid_pre"]
        if unit == "head" and "head_out" in named:
            for h in range(a.n_heads):
                writers.append((Component(f"head.{layer}.{h}", "head", layer, h), named["head_out"][:, :, h]))
            writers.append((Component(f"attn_bias.{layer}", "bias", layer), named["attn_bias_out"]))
        else:  # the token mixer, in the bridge's name for it (attn, mixer, linear_attn, conv)
            mixer = a.writers[layer][0] if a.writers and a.writers[layer][0] != "-" else "attn"
            writers.append((Component(f"{mixer}.{layer}", mixer, layer), named["attn_out"]))
        for c in a.rule_of(layer).co_writers:  # writers beside the token mixer (Falcon-H1's mamba)
            writers.append((Component(f"{c}.{layer}", c, layer), named[f"{c}_out"]))
        late = "ple_out" in named  # Gemma 4's per-layer-input write, after the MLP
        if layer in calls:  # unit="expert": one component per routed expert, plus the rest of the MoE write
            writers.extend(expert_components(model, layer, named["mlp_out"], calls.pop(layer), (b, p), bidx, pidx,
                                             moe_outs.pop(layer, None)))
        elif "mlp_out" in named:  # single-writer blocks (Mamba) have no MLP slot
            writers.append((Component(f"mlp.{layer}", "mlp", layer), named["mlp_out"]))
        if late:
            writers.append((Component(f"ple.{layer}", "ple", layer), named["ple_out"]))

    def on_global(name, t):
        glob[name] = t

    extra = []
    for l in neuron_layers:
        def grab(t, l=l):
            acts[l] = hooks.select_positions_of(t, (b, p), bidx, pidx).float()

        extra.append((down_projection(model, l)[2], grab))
    if a.logit_softcap is not None:  # the pre-cap logits z (scaled below): what the contributions add up to
        extra.append((hooks.global_point(model.bridge, "unembed", "out"),
                      lambda t: glob.__setitem__("unembed_out", hooks.select_positions_of(t, (b, p), bidx, pidx).float())))
    moe = moe_layers(model) if unit == "expert" else ()
    if unit == "expert" and not moe:
        raise StreamlensError(f"unit='expert': {model.name} has no mixture-of-experts blocks")
    moe_outs: dict[int, Tensor] = {}  # the MoE block's output before a norm that follows it (sandwich)
    for l in (l for l in moe if a.rule_of(l).write_norm("mlp") is not None):
        extra.append((hooks.block_point(model.bridge, l, "mlp", "out"), lambda t, l=l: moe_outs.__setitem__(
            l, hooks.select_positions_of(t, (b, p), bidx, pidx).float())))
    with hooks.attached(extra), experts.recording(model, moe) as calls:
        logits = capture(model, batch, pos_idx, layers=range(a.n_layers), heads=unit == "head",
                         store=lambda t: t.float(), on_layer=on_layer, on_global=on_global)
    if a.embed_is_sum and "embed" in glob:
        emb = [(Component("embed", "embed"), glob["embed"])]
        if a.has_pos_embed and "pos_embed" in glob:
            emb.append((Component("pos_embed", "embed"), glob["pos_embed"]))
    else:  # whatever enters block 0 (e.g. a scaled or projected embedding) is one writer
        emb = [(Component("embed", "embed"), glob["resid_pre0"])]
    out = emb + writers
    if a.stream_scales:  # every write reaches the final residual times the later blocks' stream scales
        out = [(c, w * a.reach(c.layer)) for c, w in out]
    return out, glob, acts, logits.float()


def pick_logits(logits: Tensor, ids: Tensor, con: Tensor | None) -> Tensor:
    """The logits of ``ids`` (minus those of ``con``): ``(b, s, k)``."""
    vals = logits.gather(-1, ids.to(logits.device))
    return vals if con is None else vals - logits.gather(-1, con.to(logits.device))
