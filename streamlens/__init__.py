"""streamlens: make the residual stream of a transformer visible.

    >>> import streamlens as sl
    >>> model = sl.load("smollm2-135m")          # or a save_pretrained folder, a hub name, a bridge
    >>> tr = sl.trace(model, "The capital of France is", positions="last")
    >>> tr.closure_error()                       # resid_post == resid_pre + attn_out + mlp_out
    >>> tr.to_dataframe()                        # per-layer norms, relative update sizes, cosines

The names below are the whole public API; each lives in the sub-package that reads like its place
in the pipeline (model -> stream -> readout / intervene -> skip, depth -> present, report; see the
README's layout section). They are imported on first use, so ``import streamlens`` (and
``streamlens --help``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from streamlens.errors import StreamlensError, UnsupportedModelError

#: public name -> the module that defines it
_WHERE = {
    "Architecture": "streamlens.model.probe",
    "Model": "streamlens.model.loading",
    "load": "streamlens.model.loading",
    "load_texts": "streamlens.stream.inputs",
    "LayerStack": "streamlens.stream.trace",
    "ResidualTrace": "streamlens.stream.trace",
    "trace": "streamlens.stream.trace",
    "TraceStats": "streamlens.stream.stats",
    "trace_stats": "streamlens.stream.stats",
    "AttentionPatterns": "streamlens.stream.attention",
    "attention_patterns": "streamlens.stream.attention",
    "Component": "streamlens.readout.components",
    "LogitDecomposition": "streamlens.readout.decompose",
    "decompose": "streamlens.readout.decompose",
    "LogitLens": "streamlens.readout.lens",
    "logit_lens": "streamlens.readout.lens",
    "ValuePaths": "streamlens.readout.paths",
    "value_paths": "streamlens.readout.paths",
    "FlowGraph": "streamlens.readout.flow",
    "information_flow": "streamlens.readout.flow",
    "InputRemoval": "streamlens.intervene.reads",
    "remove_from_input": "streamlens.intervene.reads",
    "LayerSkipEvaluator": "streamlens.skip.evaluator",
    "skip_sweep": "streamlens.skip.evaluator",
    "prune_sweep": "streamlens.skip.evaluator",
    "SkipSweep": "streamlens.skip.sweeps",
    "GradientSplit": "streamlens.depth.gradients",
    "gradient_split": "streamlens.depth.gradients",
    "Dynamics": "streamlens.depth.claims",
    "dynamics": "streamlens.depth.claims",
}

__all__ = sorted([*_WHERE, "StreamlensError", "UnsupportedModelError"])
__version__ = "0.2.0"


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # the next access is a plain attribute
        return value
    raise AttributeError(f"module 'streamlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what static tools and IDEs see
    from streamlens.depth.claims import Dynamics, dynamics
    from streamlens.depth.gradients import GradientSplit, gradient_split
    from streamlens.intervene.reads import InputRemoval, remove_from_input
    from streamlens.model.loading import Model, load
    from streamlens.model.probe import Architecture
    from streamlens.readout.components import Component
    from streamlens.readout.decompose import LogitDecomposition, decompose
    from streamlens.readout.flow import FlowGraph, information_flow
    from streamlens.readout.lens import LogitLens, logit_lens
    from streamlens.readout.paths import ValuePaths, value_paths
    from streamlens.skip.evaluator import LayerSkipEvaluator, prune_sweep, skip_sweep
    from streamlens.skip.sweeps import SkipSweep
    from streamlens.stream.attention import AttentionPatterns, attention_patterns
    from streamlens.stream.inputs import load_texts
    from streamlens.stream.stats import TraceStats, trace_stats
    from streamlens.stream.trace import LayerStack, ResidualTrace, trace
