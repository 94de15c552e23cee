"""The hybrid model: conversion, revert, and the hybrid cache against the no-cache reference."""
import pytest
import torch

from dsla_model.generate import generate_ids
from dsla_model.hybrid import HybridModel
from tests.conftest import randomize_dsla, tiny_model


def _hybrid(kind="llama", layers=(), seed=0, **kw):
    h = HybridModel(tiny_model(kind, seed=seed, **kw))
    for i in layers:
        h.convert(i)
    randomize_dsla(h, seed)
    return h


def _prompt(n, seed=0, vocab=256):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_every_layer_converted_cache_equals_no_cache(kind):
    h = _hybrid(kind, layers=range(4))
    ids = _prompt(23)
    a = generate_ids(h, ids, 20, use_cache=True)
    b = generate_ids(h, ids, 20, use_cache=False)
    assert a == b
    # Tiny random models often repeat one token, so also compare every step's logits:
    # token-by-token decoding through the cache against one full forward without it.
    seq = torch.tensor([ids + a])
    full = h(seq)
    cache = h.new_cache()
    steps = [h(seq[:, :10], cache=cache)] + [h(seq[:, t:t + 1], cache=cache) for t in range(10, seq.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layers", [(0,), (1, 3), (0, 2, 3)])
def test_partial_conversion_cache_and_pieces(layers):
    h = _hybrid(layers=layers, seed=1)
    ids = _prompt(41, seed=1)
    ref = generate_ids(h, ids, 16, use_cache=False)
    assert generate_ids(h, ids, 16, use_cache=True) == ref
    assert generate_ids(h, ids, 16, use_cache=True, prefill_pieces=2) == ref
    assert generate_ids(h, ids, 16, use_cache=True, prefill_pieces=5) == ref


def test_prefill_in_pieces_gives_same_logits():
    h = _hybrid(layers=(0, 2), seed=2)
    ids = torch.tensor([_prompt(30, seed=2)])
    whole = h(ids, cache=h.new_cache())
    cache = h.new_cache()
    first = h(ids[:, :13], cache=cache)
    second = h(ids[:, 13:], cache=cache)
    assert cache.get_seq_length() == 30
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-4, atol=1e-4)


def test_revert_restores_exact_logits():
    h = _hybrid(seed=3)
    ids = torch.tensor([_prompt(17, seed=3)])
    before = h(ids)
    for i in range(4):
        h.convert(i)
    randomize_dsla(h, 3)
    assert not torch.allclose(h(ids), before)
    for i in range(4):
        h.revert(i)
    assert torch.equal(h(ids), before)
    assert h.dsla_layers == []


def test_hf_generate_with_hybrid_cache_matches_reference_loop():
    h = _hybrid(layers=(0, 3), seed=4)
    ids = _prompt(19, seed=4)
    ref = generate_ids(h, ids, 12, use_cache=False)
    h.model.generation_config.eos_token_id = None  # the reference loop does not stop at EOS either
    h.model.generation_config.pad_token_id = 0
    out = h.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert out[0, len(ids):].tolist() == ref


def test_cache_pins_configuration_across_a_swap():
    h = _hybrid(layers=(1,), seed=5)
    ids = torch.tensor([_prompt(12, seed=5)])
    pinned = h.new_cache()
    h(ids, cache=pinned)
    old_module = h.attention(1).dsla
    # swap: a new module for layer 1, and layer 2 converted
    h.install(1, h.new_dsla_module(1))
    h.convert(2)
    assert pinned.dsla_layers == {1} and pinned.dsla_modules[1] is old_module
    # continuing the pinned sequence equals a fresh model under the old configuration
    nxt = torch.tensor([[7]])
    cont = h(nxt, cache=pinned)
    h2 = _hybrid(layers=(1,), seed=5)
    c2 = h2.new_cache()
    h2(ids, cache=c2)
    torch.testing.assert_close(cont, h2(nxt, cache=c2))


def test_dsla_cache_holds_fixed_size_states():
    h = _hybrid(layers=(0, 1, 2, 3), seed=6)
    cache = h.new_cache()
    h(torch.tensor([_prompt(10)]), cache=cache)
    size_10 = cache.state_bytes()
    h(torch.tensor([_prompt(50)]), cache=cache)
    assert cache.state_bytes() == size_10 > 0
    assert cache.get_seq_length() == 60


def test_plain_cache_with_dsla_layers_is_refused():
    from transformers import DynamicCache

    h = _hybrid(layers=(2,), seed=7)
    with pytest.raises(TypeError, match="HybridCache"):
        h(torch.tensor([_prompt(5)]), cache=DynamicCache())


def test_convert_rejects_bad_layer_and_weights():
    h = _hybrid()
    with pytest.raises(ValueError):
        h.convert(4)
    with pytest.raises(ValueError, match="do not fit"):
        h.convert(0, {"alpha": torch.zeros(2), "bogus": torch.zeros(1)})


def test_only_llama_shaped_decoders_are_taken_and_wrapping_twice_is_fine():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="not supported"):
        HybridModel(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    m = tiny_model(layers=2)
    first = HybridModel(m)
    assert HybridModel(m).num_layers == 2  # its layers are already switchable: taken as they are
    first.convert(0)  # wrapped again, converted or not: the teacher's fingerprint (its store and order cache)
    assert HybridModel(m).fingerprint == first.fingerprint


def test_attention_that_dsla_does_not_reproduce_is_refused():
    """q/k norms (Qwen3) were silently dropped by converted layers."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, vocab_size=64)
    with pytest.raises(ValueError, match="q/k norms"):
        HybridModel(Qwen3ForCausalLM(cfg))


@pytest.mark.parametrize("kind, extra", [
    ("OlmoConfig", {"clip_qkv": 0.05}),  # clipped q/k/v: the engine served other tokens
    ("SmolLM3Config", {"no_rope_layer_interval": 2}),  # layers without RoPE: other tokens
    ("PhiConfig", {}),  # partial RoPE: a shape error inside the engine's first step
    ("CohereConfig", {}),  # parallel attention and MLP: an AttributeError inside the first step
])
def test_decoders_the_engine_does_not_reproduce_are_refused(kind, extra):
    """These have q/k/v/o projections and no q/k norms, so they were taken, then computed wrongly."""
    import transformers

    cfg = getattr(transformers, kind)(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="not supported"):
        HybridModel(model)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_supported_decoders_are_taken(kind):
    assert HybridModel(tiny_model(kind, layers=1)).num_layers == 1


def test_convert_with_weights_replaces_an_installed_module_and_needs_every_weight():
    h = _hybrid()
    h.convert(0)
    first = h.attention(0).dsla
    w = {k: v + 0.5 for k, v in first.state_dict().items()}
    h.convert(0, w)  # a newer version of the layer's weights
    mod = h.attention(0).dsla
    assert mod is not first and all(torch.equal(v, w[k]) for k, v in mod.state_dict().items())
    with pytest.raises(ValueError, match="do not fit"):  # a partial checkpoint is no layer
        h.convert(1, {k: v for k, v in w.items() if k != "alpha"})
    assert h.attention(1).dsla is None and h.dsla_layers == [0]


def test_a_dsla_module_takes_the_models_dtype():
    h = HybridModel(tiny_model().to(torch.bfloat16))
    h.convert(1)
    assert {p.dtype for p in h.attention(1).dsla.parameters()} == {torch.bfloat16}
    ids = torch.tensor([_prompt(9)])
    cache = h.new_cache()
    assert h(ids, cache=cache).dtype == torch.bfloat16
