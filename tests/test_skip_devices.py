"""Blocks on several devices (a ``device_map``): what a removal replays into block ``j`` (its cached input) and
the mean write it adds there are moved to block ``j``'s own device. Without several devices here, every block
sits on the CPU and the test checks where the moves are asked to go."""

import torch

import streamlens as sl
from streamlens.model import hooks
from streamlens.report.demo import pydoc_texts

TEXTS = [t[:200] for t in pydoc_texts()[:3]]
KW = {"max_tokens": 16, "batch_size": 2, "progress": False, "n_boot": 50}


def test_replayed_block_inputs_go_to_each_blocks_own_device(tiny_models, monkeypatch):
    m = tiny_models("llama")
    asked = []
    real = hooks.param_device

    def spy(module, default):
        asked.append(module)
        return real(module, default)

    ev = sl.LayerSkipEvaluator(m, TEXTS, **KW)
    want = ev.evaluate("attn.1")
    monkeypatch.setattr(hooks, "param_device", spy)
    blocks = list(m.bridge.blocks)
    for vpp in (1, 2):  # one removal per pass (streaming.tail) and stacked removals (batched.stacked_tail)
        ev = sl.LayerSkipEvaluator(m, TEXTS, variants_per_pass=vpp, **KW)
        asked.clear()
        got = ev.evaluate_many(["attn.1", "block.0"])
        # block 1 for attn.1 (replayed from resid_pre[1]) and for block.0 (block 0 is skipped); never a block
        # the removal does not run
        assert asked and all(x is blocks[1] for x in asked)
        assert got[0] == want


class Spy(torch.Tensor):
    """A mean write that records where each ``.to`` asks it to go."""

    moves: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            Spy.moves.append(kwargs.get("device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)))
        out = super().__torch_function__(func, types, args, kwargs)
        # a slice stays a spy; what the move hands on to the model is a plain tensor again
        return out.as_subclass(torch.Tensor) if func is torch.Tensor.to and isinstance(out, torch.Tensor) else out


def test_mean_writes_are_moved_to_the_device_of_the_block_that_adds_them(tiny_models):
    m = tiny_models("llama")
    ev = sl.LayerSkipEvaluator(m, TEXTS, **KW)
    want = ev.evaluate_many(["mlp.1", "head.1.2"], mode="mean")
    ev._means = {k: v.as_subclass(Spy) for k, v in ev.ensure_means().items()}
    Spy.moves.clear()
    assert ev.evaluate_many(["mlp.1", "head.1.2"], mode="mean") == want
    assert Spy.moves and all(torch.device(d) == hooks.param_device(m.bridge.blocks[1], m.device) for d in Spy.moves)
