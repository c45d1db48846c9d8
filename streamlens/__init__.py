"""streamlens: make the residual stream of a transformer visible.

    >>> import streamlens as sl
    >>> model = sl.load("smollm2-135m")          # or a save_pretrained folder, a hub name, a bridge
    >>> tr = sl.trace(model, "The capital of France is", positions="last")
    >>> tr.closure_error()                       # resid_post == resid_pre + attn_out + mlp_out
    >>> tr.to_dataframe()                        # per-layer norms, relative update sizes, cosines
"""

from streamlens.capture import LayerStack, ResidualTrace, trace
from streamlens.data import load_texts
from streamlens.decompose import LogitDecomposition, decompose
from streamlens.dynamics import Dynamics, dynamics
from streamlens.errors import StreamlensError, UnsupportedModelError
from streamlens.gradients import GradientSplit, gradient_split
from streamlens.lens import LogitLens, logit_lens
from streamlens.model import Architecture, Model, load
from streamlens.skip import LayerSkipEvaluator, SkipSweep, skip_sweep
from streamlens.stats import TraceStats, trace_stats

__all__ = [
    "Architecture",
    "Dynamics",
    "GradientSplit",
    "LayerSkipEvaluator",
    "LayerStack",
    "LogitDecomposition",
    "LogitLens",
    "Model",
    "ResidualTrace",
    "SkipSweep",
    "StreamlensError",
    "TraceStats",
    "UnsupportedModelError",
    "decompose",
    "dynamics",
    "gradient_split",
    "load",
    "load_texts",
    "logit_lens",
    "skip_sweep",
    "trace",
    "trace_stats",
]
__version__ = "0.1.0"
