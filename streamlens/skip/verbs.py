"""The sweep verbs: :func:`skip_sweep` and :func:`prune_sweep`, each one :class:`~streamlens.LayerSkipEvaluator`
and one call on it."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from streamlens.skip.sweeps import SkipSweep
from streamlens.stream.inputs import recorded


@recorded
def skip_sweep(model, data, *, unit="block", mode: str = "skip", metrics: Sequence[str] = ("kl", "ce", "top1"),
               width=None, out=None, resume: bool = False, callback=None, prune: int | None = None,
               **evaluator_kwargs) -> SkipSweep:
    """Remove each unit in turn and measure the damage (:meth:`LayerSkipEvaluator.sweep`); see
    :class:`LayerSkipEvaluator` for the data options (``max_tokens``, ``batch_size``, ``positions``, ...).

    ``prune=`` is deprecated: greedy pruning is its own verb, :func:`prune_sweep`.
    """
    if prune is not None:
        warnings.warn("skip_sweep(prune=N) is now prune_sweep(model, data, N)", DeprecationWarning, stacklevel=2)
        return prune_sweep(model, data, prune, unit=unit, mode=mode, metrics=metrics, out=out, resume=resume,
                           **evaluator_kwargs)
    from streamlens.skip.evaluator import LayerSkipEvaluator

    ev = LayerSkipEvaluator(model, data, **evaluator_kwargs)
    return ev.sweep(unit, mode=mode, metrics=metrics, width=width, out=out, resume=resume, callback=callback)


@recorded
def prune_sweep(model, data, count: int, *, unit: str = "block", mode: str = "skip", by: str = "kl",
                metrics: Sequence[str] = ("kl", "ce", "top1"), out=None, resume: bool = False,
                **evaluator_kwargs) -> SkipSweep:
    """Greedy pruning curve (:meth:`LayerSkipEvaluator.prune`): ``count`` steps, each removing the unit that
    hurts least by ``by`` together with those already removed; one row per step. ``out=`` writes each
    step as it finishes and ``resume=True`` continues after the last one (:mod:`streamlens.skip.prunelog`)."""
    from streamlens.skip.evaluator import LayerSkipEvaluator

    ev = LayerSkipEvaluator(model, data, **evaluator_kwargs)
    return ev.prune(count, unit=unit, mode=mode, by=by, metrics=metrics, out=out, resume=resume)
