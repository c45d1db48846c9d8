import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import streamlens as sl
from streamlens.testing import build_tiny, tiny_config

EXPECTED = {
    # arch: (layout, norm, parallel)
    "gpt2": ("pre", "layernorm", False),
    "neox": ("parallel", "layernorm", True),
    "llama": ("pre", "rmsnorm", False),
    "bert": ("post", "layernorm", False),
    "gptj": ("parallel", "layernorm", True),
    "gemma": ("pre", "rmsnorm_offset", False),
    "gemma2": ("sandwich", "rmsnorm_offset", False),
    "opt": ("pre", "layernorm", False),
    "qwen2": ("pre", "rmsnorm", False),
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_architecture_is_measured(tiny_models, arch):
    m = tiny_models(arch)
    layout, norm, parallel = EXPECTED[arch]
    a = m.arch
    assert (a.layout, a.norm, a.parallel) == (layout, norm, parallel)
    assert a.n_layers == 2 and a.d_model == 32 and a.n_heads == 4
    assert a.norm_placement == ("post" if arch == "bert" else "pre")
    assert a.extra_norms == (arch == "gemma2")
    assert a.causal == (arch != "bert")
    if arch == "llama":
        assert a.n_kv_heads == 2 and a.positional == "rotary" and not a.unembed_bias  # lm_head has no bias
    if arch == "gpt2":
        assert a.has_pos_embed and a.embed_is_sum and a.final_reads_last_resid and a.logits_are_unembed


def test_tiny_model_size_is_asserted(tmp_path):
    cfg, cls = tiny_config("gpt2")
    assert sum(p.numel() for p in cls(cfg).parameters()) < 200_000
    with pytest.raises(AssertionError, match="parameters"):
        build_tiny("gpt2", tmp_path / "big", d_model=256, max_params=10_000)


def test_load_sources(tiny_dirs, tiny_models):
    folder = tiny_dirs("gpt2")
    m = tiny_models("gpt2")
    assert sl.load(m) is m
    assert sl.load(m.bridge).arch == m.arch
    hf = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    m2 = sl.load(hf, tok)
    assert m2.arch == m.arch
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
    torch.testing.assert_close(m2.run(ids, torch.ones_like(ids, dtype=torch.bool)), want, atol=1e-5, rtol=1e-5)


def test_hub_name_path_uses_boot_transformers(monkeypatch, tiny_dirs):
    """A hub name goes through the same boot call as a folder (tested with a local folder standing in)."""
    from transformer_lens.model_bridge import TransformerBridge

    seen = []
    real = TransformerBridge.boot_transformers

    def fake(name, **kw):
        seen.append(name)
        return real(str(tiny_dirs("gpt2")), **kw)

    monkeypatch.setattr(TransformerBridge, "boot_transformers", staticmethod(fake))
    m = sl.load("some-org/some-model")
    assert seen == ["some-org/some-model"] and m.name == "some-org/some-model"


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    with pytest.raises(sl.StreamlensError, match="could not load model 'no-such-org/no-such-model'"):
        sl.load("no-such-org/no-such-model")


def test_a_relative_folder_named_like_an_alias_loads_offline(tiny_dirs, tmp_path, monkeypatch):
    """A local folder called "mixtral" (a TransformerLens alias of a hub model) is the folder, not the hub's Mixtral."""
    import shutil

    shutil.copytree(tiny_dirs("gpt2"), tmp_path / "mixtral")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # fail at once, not after retries, if the hub is asked
    m = sl.load("mixtral")
    assert m.name == "mixtral" and m.arch == sl.load(str(tiny_dirs("gpt2"))).arch


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(sl.StreamlensError, match="does not exist"):
        sl.load(str(tmp_path / "nothing" / "here"))
    with pytest.raises(sl.StreamlensError, match="no config.json"):
        sl.load(str(tmp_path))


def test_train_mode_warns_on_load_and_refuses_later(tiny_dirs):
    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs("gpt2"))
    hf.train()
    with pytest.warns(UserWarning, match="train mode"):
        m = sl.load(hf, AutoTokenizer.from_pretrained(tiny_dirs("gpt2")))
    assert not m.hf.training
    m.hf.train()
    with pytest.raises(sl.StreamlensError, match="train mode"):
        sl.trace(m, "hello")
    m.hf.eval()
    sl.trace(m, "hello")


# ------------------------------------------------------------------------- the probe does not hide real errors
@pytest.mark.parametrize("exc", [MemoryError("out of host memory"), torch.OutOfMemoryError("CUDA out of memory"),
                                 KeyboardInterrupt()])
def test_the_probe_lets_resource_errors_and_interrupts_through(tiny_dirs, monkeypatch, exc):
    """Out of memory or interrupted is not "the bridge cannot run this model": the original exception propagates."""
    from transformers.models.llama import modeling_llama

    def boom(self, *args, **kwargs):
        raise exc

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", boom)
    with pytest.raises(type(exc)) as got:
        sl.load(str(tiny_dirs("llama")))
    assert got.value is exc and not isinstance(got.value, sl.StreamlensError)


def test_a_forward_error_is_refused_quoting_the_original(tiny_dirs, monkeypatch):
    from transformers.models.llama import modeling_llama

    def boom(self, *args, **kwargs):
        raise ValueError("rotary table too short\nsecond line")

    monkeypatch.setattr(modeling_llama.LlamaDecoderLayer, "forward", boom)
    with pytest.raises(sl.UnsupportedModelError, match=r"cannot run this model's forward pass "
                                                    r"\(ValueError: rotary table too short\)$") as got:
        sl.load(str(tiny_dirs("llama")))
    assert isinstance(got.value.__cause__, ValueError)
