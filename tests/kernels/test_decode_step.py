"""The fused decode step of a plain-gates DSLA layer (kernels/triton_decode_step.py): against its
torch reference, and bit for bit against the three-step path it replaced (the prep kernel, the
slot-pool step of triton_decode.py, the head scales as a separate multiply).

On CPU the kernels run through TRITON_INTERPRET=1 (see conftest.py) on small shapes; on CUDA
the same tests run compiled, and the `gpu` tests add model-sized shapes.
"""
import pytest
import torch

from kernels import reference as ref
from tests.kernels.pools import STATE_PAIRS, slot_pools
from tests.kernels.where import CUDA, DEV  # also skips this module where no Triton path runs

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kernels import triton_alloc  # noqa: E402
from kernels.triton_decode import dsla_decode_fused  # noqa: E402
from kernels.triton_decode_step import dsla_decode_step_fused  # noqa: E402

NORM, FLOOR = 16.0, -50.0  # the model's GATE_NORMALIZER and GATE_FLOOR


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every kernel output starts as NaN; a test that finds no NaN proves full coverage."""
    monkeypatch.setattr(triton_alloc, "POISON", True)


def _case(B, Hq, Hkv, Dk, Dv, R, dtype, seed, slots, floor=FLOOR, state_dtypes=STATE_PAIRS["f32"]):
    """Arguments of dsla_decode_step as the runner passes them: qkv and the gate codes are two
    column ranges of one GEMV output (rows not contiguous), pools larger than the batch."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    n = (Hq + Hkv) * Dk + Hkv * Dv
    y = r(B, n + 2 * R + 3).to(dtype)
    ang = torch.rand(B, Dk // 2, generator=g) * 6
    cos, sin = (torch.cat([f(ang)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    # up projections spread p over about -8..8: strong and weak decays, both sides of 0
    up1 = ((r(Hkv * Dk, R) * 1.5).to(dtype), (r(Hkv * Dk) * 2 + 2).to(dtype))
    up2 = ((r(Hkv * Dk, R) * 1.5).to(dtype), (r(Hkv * Dk) * 2 - 2).to(dtype))
    w = torch.softmax(r(2), 0)
    head_scale = (r(Hq) * 0.5).exp().to(dtype)
    p1, p2 = slot_pools(max(slots) + 3, Hkv, Dk, Dv, state_dtypes, g, DEV)
    dev = lambda x: x.to(DEV)  # noqa: E731
    return dict(qkv=dev(y[:, :n]), t=dev(y[:, n:n + 2 * R]), up1=tuple(map(dev, up1)), up2=tuple(map(dev, up2)),
                cos=dev(cos), sin=dev(sin), w=dev(w), head_scale=dev(head_scale), s1_pool=p1,
                s2_pool=p2, slots=torch.tensor(slots, device=DEV), num_heads=Hq, num_kv_heads=Hkv,
                gate_norm=NORM, gate_floor=floor, scale=Dk ** -0.5)


def _cpu(a):
    """A copy on the CPU (a copy on CPU machines too: the reference must not share the pools)."""
    c = lambda x: x.cpu().clone()  # noqa: E731
    return {k: (tuple(map(c, v)) if isinstance(v, tuple) else c(v) if torch.is_tensor(v) else v)
            for k, v in a.items()}


def _rel(a, b):
    assert not torch.isnan(a).any(), "NaN left in an output: not every element was written"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


# (B, Hq, Hkv, Dk, Dv, R, slots): GQA group 1, 3 and 4; Dv 48 is one and a half 32-column
# blocks; rank 8 pads to 16 in the kernel; slots distinct, unordered, with gaps
SHAPES = [(1, 2, 2, 16, 16, 4, [3]), (3, 6, 2, 16, 48, 8, [4, 0, 2]), (2, 4, 1, 32, 32, 16, [6, 1])]


@pytest.mark.parametrize("states", list(STATE_PAIRS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_step_matches_reference(dtype, shape, states):
    *dims, slots = shape
    a = _case(*dims, dtype, seed=sum(dims), slots=slots, state_dtypes=STATE_PAIRS[states])
    r = _cpu(a)
    before = a["s1_pool"].cpu().clone(), a["s2_pool"].cpu().clone()
    o_ref = ref.dsla_decode_step(**r)
    o = dsla_decode_step_fused(**a)
    assert o.dtype == dtype and o.shape == o_ref.shape
    # bf16 is rounded in the kernel (q, k, the up projections, the output twice) as in the
    # reference, but Triton's interpreter rounds toward zero where the GPU and torch round to
    # nearest: one bf16 step (2^-8) apart there, far less when compiled
    o_tol, s_tol32 = (2e-5, 2e-5) if dtype == torch.float32 else (1e-2, 2e-4) if CUDA else (2e-2, 1e-2)
    assert _rel(o.cpu(), o_ref) < o_tol
    for got, want, old in zip((a["s1_pool"], a["s2_pool"]), (r["s1_pool"], r["s2_pool"]), before):
        # a bf16 pool: both round the same fp32 states, an ulp apart at most (ties; and the
        # interpreter rounds toward zero, often)
        s_tol = s_tol32 if got.dtype == torch.float32 else max(s_tol32, 2e-3 if CUDA else 8e-3)
        got = got.cpu()
        assert _rel(got[slots], want[slots]) < s_tol
        assert _rel(got[slots], old[slots]) > 1e-2  # the step did change them
        others = [i for i in range(len(old)) if i not in slots]
        assert torch.equal(got[others], old[others])  # bit for bit: slots outside the batch untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_state_pools_track_fp32_pools(dtype):
    """Eight consecutive steps over bf16 pools stay within bf16 rounding of the same steps over
    fp32 pools (the update runs in fp32 either way; only the stored states are rounded)."""
    B, Hq, Hkv, D, R, slots = 3, 4, 2, 32, 8, [5, 0, 2]
    runs = {}
    for sd in (torch.float32, torch.bfloat16):
        a = _case(B, Hq, Hkv, D, D, R, dtype, seed=21, slots=slots, state_dtypes=(sd, sd))
        for p in (a["s1_pool"], a["s2_pool"]):  # both start from the same (bf16-representable) states
            p.copy_(p.to(torch.bfloat16))
        outs = []
        for step in range(8):
            b = _case(B, Hq, Hkv, D, D, R, dtype, seed=100 + step, slots=slots)
            b["s1_pool"], b["s2_pool"] = a["s1_pool"], a["s2_pool"]
            outs.append(dsla_decode_step_fused(**b).float().cpu())
        runs[sd] = torch.stack(outs), a["s1_pool"].float().cpu()
    (o32, s32), (o16, s16) = runs[torch.float32], runs[torch.bfloat16]
    tol = 8e-3 if CUDA else 3e-2  # the interpreter rounds toward zero: its errors add up instead of cancelling
    assert _rel(o16, o32) < tol and _rel(s16, s32) < tol
    assert _rel(s16, s32) > 0  # the bf16 pools did round: the two runs are not the same computation


def test_decode_step_gate_floor_and_consecutive_steps():
    """A floor above most log decays (the clamp decides), and three steps into the same slots:
    the second and third read states the kernel wrote."""
    a = _case(2, 4, 2, 16, 16, 8, torch.float32, seed=5, slots=[2, 0], floor=-0.02)
    r = _cpu(a)
    for step in range(3):
        g = torch.Generator().manual_seed(100 + step)
        new = torch.randn(a["qkv"].shape, generator=g)
        a["qkv"].copy_(new)
        r["qkv"] = new
        o_ref = ref.dsla_decode_step(**r)
        o = dsla_decode_step_fused(**a)
        assert _rel(o.cpu(), o_ref) < 2e-5
    assert _rel(a["s1_pool"].cpu(), r["s1_pool"]) < 2e-5 and _rel(a["s2_pool"].cpu(), r["s2_pool"]) < 2e-5
    # the clamp is active: without the floor the reference's states come out elsewhere
    r2 = _cpu(_case(2, 4, 2, 16, 16, 8, torch.float32, seed=5, slots=[2, 0], floor=-50.0))
    ref.dsla_decode_step(**r2)
    r1 = _cpu(_case(2, 4, 2, 16, 16, 8, torch.float32, seed=5, slots=[2, 0], floor=-0.02))
    ref.dsla_decode_step(**r1)
    assert _rel(r1["s2_pool"], r2["s2_pool"]) > 1e-3


def test_reference_is_the_module_math_in_fp32():
    """The reference against the model's own pieces (apply_rope, the gates' formula, the step,
    the head scale of DSLAAttention.finish); in fp32 every rounding in between is exact."""
    from dsla_model.dsla_attention import apply_rope

    B, Hq, Hkv, Dk, Dv, R = 3, 6, 2, 16, 8, 4
    a = _cpu(_case(B, Hq, Hkv, Dk, Dv, R, torch.float32, seed=11, slots=[1, 4, 2]))
    pools = a["s1_pool"].clone(), a["s2_pool"].clone()
    o = ref.dsla_decode_step(**a)
    qkv, t = a["qkv"], a["t"]
    cos, sin = a["cos"][:, None], a["sin"][:, None]
    q = apply_rope(qkv[:, None, :Hq * Dk].reshape(B, 1, Hq, Dk), cos, sin)[:, 0]
    k = apply_rope(qkv[:, None, Hq * Dk:(Hq + Hkv) * Dk].reshape(B, 1, Hkv, Dk), cos, sin)[:, 0]
    v = qkv[:, (Hq + Hkv) * Dk:].reshape(B, Hkv, Dv)
    g1, g2 = (torch.nn.functional.logsigmoid(torch.nn.functional.linear(c, *up)).div(NORM).clamp_min(FLOOR)
              .view(B, Hkv, Dk) for c, up in ((t[:, :R], a["up1"]), (t[:, R:], a["up2"])))
    want = ref.dsla_step_slots(q, k, v, g1, g2, a["w"], *pools, a["slots"], a["scale"])
    want = want * a["head_scale"][:, None]
    assert _rel(o, want) < 1e-6
    assert _rel(a["s1_pool"], pools[0]) < 1e-6 and _rel(a["s2_pool"], pools[1]) < 1e-6


def test_ops_dispatch_off_cuda_is_the_reference():
    from kernels import ops

    a = _cpu(_case(2, 2, 1, 16, 16, 4, torch.float32, seed=3, slots=[0, 1]))
    b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()}
    assert torch.equal(ops.dsla_decode_step(**a), ref.dsla_decode_step(**b))
    assert torch.equal(a["s1_pool"], b["s1_pool"])


def test_decode_step_rejects_bad_input():
    a = _case(2, 4, 2, 16, 16, 4, torch.float32, seed=0, slots=[0, 1])
    bad = [dict(num_heads=5), dict(qkv=a["qkv"][:, :-1]), dict(t=a["t"][:, :-1]),
           dict(head_scale=a["head_scale"][:3]), dict(s1_pool=a["s1_pool"].double()),
           dict(s2_pool=a["s2_pool"][:, :1]), dict(slots=a["slots"][:1])]
    for change in bad:
        with pytest.raises(ValueError):
            dsla_decode_step_fused(**{**a, **change})
    for change in bad[:4]:
        with pytest.raises(ValueError):
            ref.dsla_decode_step(**{**_cpu(a), **change})
    # a head dim the kernel's RoPE halves cannot hold (the reference takes any even one)
    c = _case(1, 2, 1, 12, 16, 4, torch.float32, seed=0, slots=[0])
    with pytest.raises(ValueError, match="power-of-two"):
        dsla_decode_step_fused(**c)
    ref.dsla_decode_step(**_cpu(c))


# ---------------------------------------------------------------- the path it replaced
# The prep kernel the engine ran before this kernel, kept here as the baseline the fused step
# must reproduce bit for bit.


@triton.jit
def _prep_gate_up(T, Wu, Bu, G, b, hk, R, s_t, OUT_DTYPE: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
                  HKV: tl.constexpr, gate_norm, gate_floor):
    rr = tl.arange(0, RP)
    t = tl.load(T + b * s_t + rr, mask=rr < R, other=0.0).to(tl.float32)
    d = tl.arange(0, D)
    wu = tl.load(Wu + (hk * D + d)[:, None] * R + rr[None, :], mask=rr[None, :] < R, other=0.0).to(tl.float32)
    p = tl.sum(wu * t[None, :], 1) + tl.load(Bu + hk * D + d).to(tl.float32)
    p = p.to(OUT_DTYPE).to(tl.float32)
    ls = tl.minimum(p, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(p)))
    tl.store(G + (b * HKV + hk) * D + d, tl.maximum(ls / gate_norm, gate_floor))


@triton.jit
def _prep(QKV, T, Wu1, Bu1, Wu2, Bu2, Cos, Sin, QO, KO, VO, G1, G2, s_qkv, s_t, s_c, R, gate_norm, gate_floor,
          HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, RP: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    half = tl.arange(0, D // 2)
    c1 = tl.load(Cos + b * s_c + half).to(tl.float32)
    c2 = tl.load(Cos + b * s_c + D // 2 + half).to(tl.float32)
    s1 = tl.load(Sin + b * s_c + half).to(tl.float32)
    s2 = tl.load(Sin + b * s_c + D // 2 + half).to(tl.float32)
    if h < HQ:
        src = QKV + b * s_qkv + h * D
        dst = QO + (b * HQ + h) * D
    else:
        hk = h - HQ
        src = QKV + b * s_qkv + (HQ + hk) * D
        dst = KO + (b * HKV + hk) * D
        d = tl.arange(0, D)
        tl.store(VO + (b * HKV + hk) * D + d, tl.load(QKV + b * s_qkv + (HQ + HKV + hk) * D + d))
        _prep_gate_up(T, Wu1, Bu1, G1, b, hk, R, s_t, QO.dtype.element_ty, RP, D, HKV, gate_norm, gate_floor)
        _prep_gate_up(T + R, Wu2, Bu2, G2, b, hk, R, s_t, QO.dtype.element_ty, RP, D, HKV, gate_norm, gate_floor)
    x1 = tl.load(src + half).to(tl.float32)
    x2 = tl.load(src + D // 2 + half).to(tl.float32)
    tl.store(dst + half, (x1 * c1 - x2 * s1).to(QO.dtype.element_ty))
    tl.store(dst + D // 2 + half, (x2 * c2 + x1 * s2).to(QO.dtype.element_ty))


@triton.jit
def _scale_heads(X, S, Y, HQ: tl.constexpr, D: tl.constexpr):
    """The o-projection GEMV's prologue on its own: x * scale[k // D] in fp32, rounded once."""
    r = tl.program_id(0)
    d = tl.arange(0, D)
    x = tl.load(X + r * D + d)
    s = tl.load(S + r % HQ)
    tl.store(Y + r * D + d, (x.to(tl.float32) * s.to(tl.float32)).to(Y.dtype.element_ty))


def _three_step(qkv, t, up1, up2, cos, sin, w, head_scale, s1_pool, s2_pool, slots, num_heads, num_kv_heads,
                gate_norm, gate_floor, scale):
    """What the engine ran before: prep (v's head dim is q's there), the slot-pool step, then
    the head scales as the o projection's prologue applied them (in Triton, so that the
    interpreter rounds it as it rounds the fused kernel)."""
    B, D = cos.shape
    R = up1[0].shape[1]
    q = torch.empty(B, num_heads, D, device=qkv.device, dtype=qkv.dtype)
    k, v = (torch.empty(B, num_kv_heads, D, device=qkv.device, dtype=qkv.dtype) for _ in range(2))
    g1, g2 = (torch.empty(B, num_kv_heads, D, device=qkv.device, dtype=torch.float32) for _ in range(2))
    _prep[(B, num_heads + num_kv_heads)](
        qkv, t, *up1, *up2, cos, sin, q, k, v, g1, g2, qkv.stride(0), t.stride(0), cos.stride(0),
        R, float(gate_norm), float(gate_floor), HQ=num_heads, HKV=num_kv_heads, D=D,
        RP=max(16, triton.next_power_of_2(R)), num_warps=1)
    o = dsla_decode_fused(q, k, v, g1, g2, w, s1_pool, s2_pool, slots, scale)
    y = torch.empty_like(o)
    _scale_heads[(B * num_heads,)](o, head_scale, y, HQ=num_heads, D=D)
    if CUDA:  # the cuBLAS fallback's form of the same multiply: torch rounds it the same way
        assert torch.equal(y, o * head_scale[:, None])
    return y


def _check_bitwise(B, Hq, Hkv, D, R, dtype, slots, seed, exact=True):
    a = _case(B, Hq, Hkv, D, D, R, dtype, seed=seed, slots=slots)
    b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in a.items()}
    want = _three_step(**b)
    got = dsla_decode_step_fused(**a)
    if not exact:  # within a couple of ulps of the output dtype, and of fp32 for the states
        torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-5)
        for k in ("s1_pool", "s2_pool"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        return
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()
    assert torch.equal(a["s1_pool"], b["s1_pool"]) and torch.equal(a["s2_pool"], b["s2_pool"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_step_is_bitwise_the_three_step_path(dtype):
    """Small shapes (interpreted on CPU): the same roundings in the same places. (Head dim 64:
    the smallest whose gate tiles get the prep kernel's layout when compiled.)"""
    if CUDA and dtype == torch.float32:
        pytest.skip("compiled fp32 may differ in the last bits (FMA contraction; see triton_decode_step.py)")
    _check_bitwise(3, 6, 2, 64, 8, dtype, [4, 0, 2], seed=21)
    _check_bitwise(1, 2, 2, 64, 16, dtype, [1], seed=22)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,Hq,Hkv,D,R", [(4, 32, 32, 128, 16), (1, 32, 32, 128, 16), (16, 32, 8, 128, 16),
                                          (3, 8, 2, 64, 8)])
def test_gpu_decode_step_is_bitwise_the_three_step_path(dtype, B, Hq, Hkv, D, R):
    """Compiled: the Llama-2-7B layer at batch 1, 4 and 16 (and GQA shapes): output and both
    state pools bit for bit equal to prep + dsla_decode_fused + the head-scale multiply in bf16
    (the engine's dtype). fp16 only to rounding: on an H200 with Triton 3.6 one shape of four
    came out one fp16 ulp apart (the compiler may order the gates' up-projection sum
    differently in the two kernels)."""
    _check_bitwise(B, Hq, Hkv, D, R, dtype, list(range(2 * B - 1, -1, -2)), seed=B + Hkv,
                   exact=dtype == torch.bfloat16)
