"""The runner's cos/sin table (one for every step) under dynamic RoPE, served with max_model_len
above the model's positions: a call reaching past them rescales every position's frequencies, so
a one-call table gave short prompts other rotations than the model gives them."""
import torch
import transformers

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from dsla_model.hybrid import HybridModel

POSITIONS = 64


def dynamic_rope_hybrid():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                                   tie_word_embeddings=False, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return HybridModel(model)


def _logprobs(eng, p):
    rid = eng.add_request(p, SamplingParams(max_tokens=8, temperature=0, logprobs=True, ignore_eos=True))
    out = []
    while eng.has_unfinished():
        out += [ev.logprob for ev in eng.step() if ev.request_id == rid]
    return out


def test_dynamic_rope_table_keeps_the_models_rotations_for_the_positions_it_has():
    h = dynamic_rope_hybrid()
    inv_freq = h.model.model.rotary_emb.inv_freq.clone()
    short = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20, max_model_len=POSITIONS))  # the model's table
    long = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20, max_model_len=4 * POSITIONS))
    assert torch.equal(long.runner.cos[:POSITIONS], short.runner.cos)
    assert long.runner.cos.shape[0] == 4 * POSITIONS
    assert torch.equal(h.model.model.rotary_emb.inv_freq, inv_freq)  # the model's module left unscaled
    p = list(range(5, 25))
    assert _logprobs(long, p) == _logprobs(short, p)
    with torch.no_grad():
        ref = torch.log_softmax(h(torch.tensor([p + [0] * 8]))[0].float(), -1)  # positions only matter here
    assert abs(_logprobs(short, p)[0] - ref[len(p) - 1].max().item()) < 1e-4


def longrope_hybrid(original=16):
    half = 8  # head_dim 16: one factor per frequency
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                                   tie_word_embeddings=False, initializer_range=0.08,
                                   rope_scaling={"rope_type": "longrope", "factor": POSITIONS / original,
                                                 "original_max_position_embeddings": original,
                                                 "short_factor": [1.0 + 0.1 * i for i in range(half)],
                                                 "long_factor": [2.0 + 0.5 * i for i in range(half)]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    return HybridModel(model)


def test_longrope_engine_matches_hf_generate_within_and_past_the_original_context():
    """The table came from one call reaching max_model_len, which longrope answers with the long
    factors for every position: prompts within the original context were rotated as HF never does."""
    h = longrope_hybrid()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 12, 30)]  # the last past 16
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)  # the first two decode past 16
    for kw in ({}, {"max_batched_tokens": 8, "max_running": 3}):  # chunked prefill too
        got = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20, **kw)).generate(prompts, sp)
        for p, tokens in zip(prompts, got):
            ref = h.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12, min_new_tokens=12,
                                   pad_token_id=0)[0, len(p):].tolist()
            assert tokens == ref, (len(p), kw)


def test_longrope_one_token_prompt_chunks_on_the_decode_graph_path():
    """A step of one-token items runs the decode graphs, which read the shared table (short factors
    before the original context): a long prompt's one-token chunks there were rotated short."""
    from tests.engine.conftest import pipelined

    h = longrope_hybrid()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 30)]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    eng = pipelined(Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20, max_batched_tokens=2, max_running=2)))
    got = eng.generate(prompts, sp)
    for p, tokens in zip(prompts, got):
        ref = h.model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=8, min_new_tokens=8,
                               pad_token_id=0)[0, len(p):].tolist()
        assert tokens == ref, len(p)


def test_longrope_resumed_request_continues_the_uninterrupted_stream():
    """A resumed request's prompt ends with the earlier attempt's output: that it reaches past the
    original context does not make the prompt proper long (its positions were rotated short)."""
    h = longrope_hybrid()
    p = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(1)).tolist()
    eng = Engine(h, None, EngineConfig(cache_memory_bytes=4 << 20))
    full = eng.generate([p], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    k = 14  # the resumed prompt: 19 tokens, past the original 16
    got = eng.generate([p + full[:k]], SamplingParams(max_tokens=20 - k, temperature=0, ignore_eos=True,
                                                      resume_tokens=k))[0]
    assert got == full[k:]
