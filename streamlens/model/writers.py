"""The writers of a block beyond the plain rule, measured on the probe's numbers.

A block is a set of writers. Beside the two slots of :mod:`streamlens.model.layouts` (token mixer and
channel mixer), the probe looks for

* *true write points*: points inside a slot that the bridge's hook aliases name as its write
  (``hook_attn_out: attn.o.hook_out``: Bloom, MPT);
* *co-writers*: components with an output hook that no slot places, written beside the token mixer
  on the same read (Falcon-H1's ``mamba``);
* *per-writer multipliers*: ``resid_mid − resid_pre = Σ_w r_w · w_out`` solved by least squares on the
  recorded writes (Falcon-H1's ``attention_out_multiplier`` and ``ssm_out_multiplier``), the config's
  value kept where it is the one measured.

The probe then keeps an adjusted layout only where its equations hold on the model's own numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from streamlens.model import hooks
from streamlens.model.layouts import SUBLAYERS, Layout

if TYPE_CHECKING:
    from streamlens.model.loading import Model

#: Block parts the layouts place: norms and the components that fill the two writer slots.
PLACED = {"ln1", "ln2", "ln1_post", "ln2_post", "norm", *(n for names in hooks.SLOTS.values() for n in names),
          "per_layer_input_gate", "per_layer_projection", "post_per_layer_input_norm"}  # Gemma 4's third writer


def true_write_candidates(bridge: nn.Module, layer: int) -> dict[str, tuple[str, str]]:
    """Points *inside* a slot that the bridge's hook aliases name as its write (``hook_attn_out: attn.o.hook_out``)."""
    aliases = getattr(bridge.blocks[layer], "hook_aliases", None) or {}
    out = {}
    for sub in SUBLAYERS:
        target = aliases.get(f"hook_{sub}_out")
        target = next((t for t in target if isinstance(t, str)), None) if isinstance(target, (list, tuple)) else target
        if isinstance(target, str) and target.startswith(f"{sub}.") and target.endswith(".hook_out"):
            comp = target[: -len(".hook_out")]
            if comp != sub:
                out[sub] = (comp, "out")
    return out


#: Config multipliers applied to a writer's output after its hook (Falcon-H1), preferred where they are the
#: value measured.
_OUT_MULTIPLIERS = {"attn": ("attention_out_multiplier",), "mamba": ("ssm_out_multiplier",),
                    "mlp": ("residual_multiplier",)}


def co_writer_candidates(model: Model, layer: int, raw: dict) -> tuple[str, ...]:
    """Components of block ``layer`` that no slot places but that have an output hook that fired: possible
    writers beside the token mixer (Falcon-H1's ``mamba``)."""
    return tuple(n for n, m in model.bridge.blocks[layer].named_children()
                 if hasattr(m, "hook_out") and not n.startswith("_") and n not in PLACED and (n, "out") in raw)


def stream_scale(model: Model, layer: int, lay: Layout, raw: dict) -> Layout:
    """``lay`` with block ``layer``'s scale of the whole stream, ``resid_post = s · (ple_read + ple_out)``, measured
    by least squares (the block's own ``layer_scalar`` where it is the value measured; Gemma 4)."""
    named = lay.named(raw, SUBLAYERS, True)
    x, y = (named["ple_read"] + named["ple_out"]).double(), named["resid_post"].double()
    s = float((x * y).sum() / (x * x).sum().clamp_min(1e-30))
    block = getattr(model.bridge.blocks[layer], "original_component", None)
    own = getattr(block, "layer_scalar", None)
    if isinstance(own, torch.Tensor) and own.numel() == 1 and abs(float(own) - s) <= 1e-4 * max(abs(float(own)), 1e-6):
        s = float(own)
    return lay.with_stream_scale(s)


def measured_scales(model: Model, base: Layout, raw: dict, co: tuple[str, ...]) -> dict[str, float]:
    """Each writer's multiplier ``r_w`` in ``resid_mid − resid_pre = Σ_w r_w · w_out`` (least squares, float64),
    and the MLP's in ``resid_post − resid_mid = r · mlp_out``; the config's value where it is the one measured."""
    mid = raw.get(base.resid_mid_point) if base.resid_mid_point is not None else None
    pre, post = raw.get(("block", "in")), raw.get(("block", "out"))
    if pre is None or post is None or any((w, "out") not in raw for w in ("attn", "mlp", *co)):
        return {}
    groups = [(("attn", *co), (mid if mid is not None else post - raw[("mlp", "out")]) - pre)]
    if mid is not None:
        groups.append((("mlp",), post - mid))
    cfg = getattr(model.hf, "config", None)
    out: dict[str, float] = {}
    for writers, target in groups:
        a = torch.stack([raw[(w, "out")].double().reshape(-1) for w in writers], 1)  # (values, writers)
        sol = torch.linalg.lstsq(a, target.double().reshape(-1, 1)).solution[:, 0]
        for w, r in zip(writers, sol.tolist()):
            known = [float(v) for k in _OUT_MULTIPLIERS.get(w, ()) if isinstance(v := getattr(cfg, k, None), (int, float))]
            out[w] = next((v for v in [*known, 1.0] if abs(v - r) <= 1e-4 * max(abs(v), 1e-6)), r)
    return out
