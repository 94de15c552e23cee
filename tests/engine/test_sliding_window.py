"""Models with a sliding attention window (Mistral, Qwen2 with use_sliding_window): nothing may
compute attention over more tokens than the model's window lets it see."""
import pytest
import torch
import transformers

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from dsla_model.generate import generate_ids
from dsla_model.hybrid import HybridModel
from tests.conftest import tiny_config

WINDOW = 8


def windowed_hybrid(dsla_layers=(1,)):
    cfg = tiny_config("mistral")
    cfg.sliding_window = WINDOW
    torch.manual_seed(0)
    h = HybridModel(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval())
    for i in dsla_layers:
        h.convert(i)
    return h


def prompt(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_hybrid_cache_decodes_past_the_window_like_no_cache():
    h = windowed_hybrid()
    p = prompt(20)
    assert generate_ids(h, p, 6, 0.0) == generate_ids(h, p, 6, 0.0, use_cache=False)


def test_engine_refuses_what_its_full_attention_would_compute_wrongly():
    """The engine's attention sees every earlier token; within the window that is what the model
    computes, past it it is not, so the engine's context stops at the window."""
    h = windowed_hybrid()
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    assert eng.max_model_len == WINDOW
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request(prompt(20), SamplingParams(max_tokens=6, temperature=0))
    p = prompt(5)
    assert eng.generate([p], SamplingParams(max_tokens=3, temperature=0))[0] == generate_ids(h, p, 3, 0.0,
                                                                                            use_cache=False)
    with pytest.raises(ValueError, match="sliding window"):
        Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20, max_model_len=64))


def test_qwen2_without_sliding_layers_keeps_its_full_length():
    cfg = tiny_config("qwen2")
    cfg.sliding_window = WINDOW  # set, but no layer uses it (use_sliding_window is off)
    torch.manual_seed(0)
    h = HybridModel(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval())
    assert Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20)).max_model_len == 512
