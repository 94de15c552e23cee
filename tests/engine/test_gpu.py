"""The CUDA path (graphs + fused kernels) gives the reference loop's greedy tokens (CUDA only;
also runs as a script on the device machine, which has no pytest)."""
import pytest
import torch

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from dsla_model.generate import generate_ids
from tests.engine.conftest import random_prompts, tiny_hybrid


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_matches_reference():
    h = tiny_hybrid(dsla_layers=(1, 3), heads=4, kv_heads=2, hidden=256).cuda()  # head_dim 64
    prompts = random_prompts(12, 256, lo=3, hi=120, seed=4)
    sp = SamplingParams(max_tokens=24, temperature=0)
    eng = Engine(h, None, EngineConfig(max_running=8, max_batched_tokens=128, cache_memory_bytes=64 << 20))
    chains, chain = [], eng._chain
    eng._chain = lambda: chains.append(1) or chain()
    got = eng.generate(prompts, sp)
    assert eng.graphs is not None and eng.graphs.captures >= 1
    assert chains  # the pipelined path (graph writes its own next inputs) ran
    same = sum(g == generate_ids(h, p, 24, 0.0) for p, g in zip(prompts, got))
    assert same == len(prompts), f"{same}/{len(prompts)} equal"
    eng.set_conversion([0, 1, 2, 3])
    got2 = eng.generate(prompts[:4], sp)
    assert all(g == generate_ids(h, p, 24, 0.0) for p, g in zip(prompts[:4], got2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("states", ["bfloat16", "bfloat16-recency"])
def test_cuda_graph_engine_with_bf16_states(states):
    """bf16 state pools (both states, or the recency state only) through graphs and the fused step:
    a batch gives each prompt the tokens it gets alone (every prompt prefills whole either way), and
    mostly the fp32 reference's."""
    h = tiny_hybrid(dsla_layers=(0, 1, 3), heads=4, kv_heads=2, hidden=256).cuda()
    prompts = random_prompts(10, 256, lo=3, hi=120, seed=6)
    sp = SamplingParams(max_tokens=24, temperature=0)
    cfg = dict(max_running=8, max_batched_tokens=2048, cache_memory_bytes=64 << 20, state_dtype=states)
    eng = Engine(h, None, EngineConfig(**cfg))
    assert eng.pool.s2.dtype == torch.bfloat16
    assert eng.pool.s1.dtype == (torch.bfloat16 if states == "bfloat16" else torch.float32)
    got = eng.generate(prompts, sp)
    assert eng.graphs is not None and eng.graphs.captures >= 1
    for p, g in zip(prompts, got):
        assert g == Engine(h, None, EngineConfig(**cfg)).generate([p], sp)[0]
    same = sum(g == generate_ids(h, p, 24, 0.0) for p, g in zip(prompts, got))
    assert same >= 7, f"{same}/{len(prompts)} equal to the fp32 reference"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_head_dim_that_is_not_a_power_of_two_decodes_op_by_op():
    """Llama-family configs allow head dims like 80 (h2o-danube2) or 100 (OpenLLaMA-3B); the Triton
    decode kernels tile a head with tl.arange(0, D), so the CUDA engine could not decode them at all."""
    h = tiny_hybrid(dsla_layers=(1,), heads=2, kv_heads=1, hidden=160).cuda()  # head_dim 80
    prompts = random_prompts(4, 256, lo=3, hi=40, seed=5)
    eng = Engine(h, None, EngineConfig(max_running=4, max_batched_tokens=128, cache_memory_bytes=16 << 20))
    assert not eng.runner.fused_decode
    got = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    assert all(g == generate_ids(h, p, 12, 0.0) for p, g in zip(prompts, got))


if __name__ == "__main__":
    test_cuda_graph_engine_matches_reference()
    test_cuda_graph_engine_with_bf16_states("bfloat16")
    test_cuda_graph_engine_with_bf16_states("bfloat16-recency")
    print("gpu engine test passed")
