"""Softmax attention over the paged KV pool.

Two forms:
  - `attend_pieces`: any number of new tokens per sequence (prefill chunks and
    decode alike), one SDPA call per sequence over its gathered KV. Exact per
    sequence: nothing about one sequence depends on the others in the batch.
  - `paged_decode`: one query token per sequence, all sequences at once, static
    shapes (what a captured CUDA graph runs). On CUDA the Triton kernel reads the
    blocks in place; elsewhere a gather + masked SDPA stands in for it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gather_kv(kv_pool, table_row, length):
    """K, V [1, Hkv, length, D] of one sequence from its block table row: one gather each, straight
    into a strided view SDPA takes as is (a gather of both then a reshape of each half copied the
    sequence's KV twice more, ~15% of a 32K prefill on an H200: bench/results/engine_prefill.md)."""
    bs = kv_pool.shape[2]
    nb = math.ceil(length / bs)
    rows = table_row[:nb]

    def half(i):
        x = kv_pool[:, i].index_select(0, rows)  # [nb, bs, Hkv, D], contiguous
        return x.view(nb * bs, *x.shape[2:])[:length].transpose(0, 1)[None]

    return half(0), half(1)


def attend_pieces(q, kv_pool, tables, pieces, scale):
    """q [N,Hq,D] (the step's tokens, sequence after sequence); tables [B,nb] on q's device;
    pieces: (start, n) per sequence. Returns o [N,Hq,D]."""
    out = torch.empty_like(q)
    a = 0
    for i, (start, n) in enumerate(pieces):
        length = start + n
        k, v = gather_kv(kv_pool, tables[i], length)
        qi = q[a:a + n].transpose(0, 1)[None]  # [1,Hq,n,D]
        if n == 1:
            o = F.scaled_dot_product_attention(qi, k, v, scale=scale, enable_gqa=True)
        elif start == 0:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:  # query t of the piece sees keys up to start + t: causal aligned to the lower right
            # imported here: torch.nn.attention.bias imports torch._dynamo, and with it Triton, whose
            # CPU interpreter must be chosen (TRITON_INTERPRET) before Triton is first imported
            from torch.nn.attention.bias import causal_lower_right

            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=causal_lower_right(n, length), scale=scale,
                                               enable_gqa=True)
        out[a:a + n] = o[0].transpose(0, 1)
        a += n
    return out


def paged_decode_torch(q, kv_pool, table, seq_lens, scale):
    """q [B,Hq,D]; table [B,nb]; seq_lens [B] -> o [B,Hq,D]. Reads the whole table width."""
    B, nb = table.shape
    bs = kv_pool.shape[2]
    blocks = kv_pool[table]  # [B, nb, 2, bs, Hkv, D]
    k = blocks[:, :, 0].reshape(B, nb * bs, *blocks.shape[4:]).transpose(1, 2)
    v = blocks[:, :, 1].reshape(B, nb * bs, *blocks.shape[4:]).transpose(1, 2)
    valid = torch.arange(nb * bs, device=q.device)[None, :] < seq_lens[:, None]
    # Table entries past a sequence's blocks point at the scratch block, which padded rows and the
    # scratch state pair write garbage into (inf or NaN bit patterns too). SDPA adds the mask to the
    # scores (NaN - inf is NaN) and weights the values (0 * inf is NaN): both must be zeros there.
    pad = ~valid[:, None, :, None]
    k, v = k.masked_fill(pad, 0), v.masked_fill(pad, 0)
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None, :], scale=scale,
                                       enable_gqa=True)
    return o[:, :, 0]


def _triton_ok(q) -> bool:
    # the Triton decode kernels tile a head with tl.arange(0, D): a power of two only (Llama-family
    # configs allow e.g. 80 or 100); other head dims take the torch form
    if not q.is_cuda or q.shape[-1] & (q.shape[-1] - 1):
        return False
    try:
        import kernels.triton_paged_attention  # noqa: F401
    except ImportError:
        return False
    return True


def paged_decode(q, kv_pool, table, seq_lens, scale, num_splits: int | None = None):
    if _triton_ok(q):
        from kernels.triton_paged_attention import paged_decode_attention

        return paged_decode_attention(q, kv_pool, table, seq_lens, scale, num_splits)
    return paged_decode_torch(q, kv_pool, table, seq_lens, scale)
