"""The GPU engine on the real default model: SmolLM2-135M in bf16 (9 query and 3 kv heads of 64,
hidden 576, shapes no tiny config has), half its layers DSLA with the shipped store's trained
weights, through CUDA graphs, the skinny GEMVs, paged attention and the fused DSLA step.

The engine's greedy tokens are checked against the model's own forward over the same tokens
(teacher-forced, the chunked prefill kernels and SDPA): every chosen token must be that forward's
argmax or a near tie. Bitwise equality is not asked: the two paths round bf16 in different
orders, and a near tie may go either way.
"""
import pytest
import torch

from dsla_model.engine import Engine, EngineConfig, SamplingParams
from tests.conftest import skip_without_default_model

TEXTS = ["The GNU General Public License is a free, copyleft license for", "def fibonacci(n):\n    ",
         "Once upon a time, in a small village by the sea,", "Paris is the capital of", "1, 2, 3, 4, 5,",
         "Q: What is two plus two?\nA:", "Linear attention replaces the softmax with", "Dear Sir or Madam,"]
NEAR_TIE = 0.5  # nats below the forward's best token: bf16 logits of 16-32 are 0.125 apart, 4 steps of that
# (0.25 failed once at 0.375 when the deltas were first folded; folded against op by op is checked
# tightly by the test below)
STEPS = 40


def _shipped_half(device, dtype):
    from dsla_model.hybrid import HybridModel
    from dsla_model.layer_store import LayerStore, shipped_store
    from dsla_model.loading import load_model
    from dsla_model.order_cache import layers_for_conversion

    model, tok, _ = load_model("default", dtype=dtype, device=device)
    h = HybridModel(model)
    store = LayerStore(shipped_store(h.fingerprint))
    layers = layers_for_conversion(store.read_manifest()["order"], 0.5)
    store.apply(h, layers)
    return h, tok, layers


def check_against_forward(h, tok, states, long_prompt_tokens=700):
    """Runs the prompts (one of them long: several prefill chunks, many KV blocks) through the
    engine and scores its tokens with the model's forward; returns the share of exact argmaxes."""
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    with open("/usr/share/common-licenses/GPL-3", encoding="utf-8") as f:
        prompts.append(tok(f.read())["input_ids"][:long_prompt_tokens])
    sp = SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True)
    eng = Engine(h, tok, EngineConfig(max_running=8, max_batched_tokens=256, cache_memory_bytes=256 << 20,
                                      state_dtype=states))
    got = eng.generate(prompts, sp)
    exact = total = 0
    dev = next(h.parameters()).device
    with torch.no_grad():
        for p, g in zip(prompts, got):
            assert len(g) == STEPS
            lp = torch.log_softmax(h(torch.tensor([p + g], device=dev))[0, len(p) - 1:-1].float(), -1)
            chosen = lp.gather(1, torch.tensor(g, device=dev)[:, None])[:, 0]
            gap = lp.max(-1).values - chosen
            assert gap.max().item() <= NEAR_TIE, (p[:8], g, gap.tolist())
            exact += int((gap == 0).sum())
            total += len(g)
    return eng, exact / total


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("states", ["float32", "bfloat16-recency"])
def test_default_model_half_converted_on_the_gpu_engine(states):
    skip_without_default_model()
    h, tok, layers = _shipped_half("cuda", torch.bfloat16)
    assert len(layers) == 15 and h.dsla_layers == layers
    eng, share = check_against_forward(h, tok, states)
    assert eng.graphs is not None and eng.graphs.captures >= 1
    assert share >= 0.9, share


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_folded_deltas_decode_like_the_op_by_op_path():
    """The shipped layers' deltas folded into the projections (W + U D, one bf16 rounding) against
    the op-by-op path (two roundings): the same greedy tokens while they agree, and the same
    log-probabilities for them within two bf16 steps of a logit."""
    from dsla_model.engine.runner import ModelRunner

    skip_without_default_model()
    h, tok, _ = _shipped_half("cuda", torch.bfloat16)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    sp = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=True)

    def run():
        eng = Engine(h, tok, EngineConfig(max_running=8, max_batched_tokens=256, cache_memory_bytes=256 << 20))
        ids = [eng.add_request(p, sp) for p in prompts]
        out = {i: [] for i in ids}
        while eng.has_unfinished():
            for e in eng.step():
                if e.token_id >= 0:
                    out[e.request_id].append((e.token_id, e.logprob))
        return [out[i] for i in ids]

    folded = run()
    fused_step = ModelRunner._fused_step
    ModelRunner._fused_step = lambda self, i, mod: mod.deltas is None and fused_step(self, i, mod)
    try:
        plain = run()
    finally:
        ModelRunner._fused_step = fused_step
    same = total = 0
    for a, b in zip(folded, plain):
        for (ta, la), (tb, lb) in zip(a, b):
            total += 1
            if ta != tb:
                break  # a near tie went the other way: the rest follows another text
            same += 1
            assert abs(la - lb) <= 0.25, (ta, la, lb)
    assert same >= 0.8 * total, (same, total)
