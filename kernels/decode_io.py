"""The two ends of a decode step over static buffers (the CUDA-graph form): `step_inputs`
gathers what the first layer and every attention layer need from the token ids and
positions; `greedy_next` takes the argmax token and writes the next step's ids and
positions in place. One Triton launch each on CUDA (kernels/triton_decode_io.py), torch
ops elsewhere; both forms give the same values (the sum of squares up to its order)."""
from __future__ import annotations

import torch

from kernels.gemv_epilogue import MAX_M, norm_parts


def _triton(t: torch.Tensor) -> bool:
    from kernels.ops import _use_triton

    return _use_triton(t)


def step_inputs(ids, pos, embed, norm_weight, cos_table, sin_table, tables, block_size):
    """ids, pos [B]; embed [V, H]; tables [L, B, nb] -> (x [B, H], hg [B, H], sq [1, max(16, B)],
    cos, sin [B, D], wblk [L, B], woff [B], lens [B]): the embeddings, the first RMSNorm's
    parts (gemv_epilogue.norm_parts), the RoPE rows, and each layer's write block and offset
    and the attention lengths for this token."""
    B = ids.shape[0]
    if not _triton(ids):
        x = torch.nn.functional.embedding(ids, embed)
        hg, sq = norm_parts(x, norm_weight)
        wblk = tables[:, torch.arange(B, device=ids.device), pos // block_size]
        return x, hg, sq, cos_table[pos], sin_table[pos], wblk, pos % block_size, pos + 1
    from kernels.triton_decode_io import _prologue_kernel

    if embed.stride(1) != 1 or cos_table.stride(1) != 1 or cos_table.stride() != sin_table.stride() \
            or tables.stride(2) != 1 or not norm_weight.is_contiguous():
        raise ValueError("step_inputs needs unit stride along the embedding, RoPE and table rows")
    H, D, L = embed.shape[1], cos_table.shape[1], tables.shape[0]
    dev = ids.device
    x = torch.empty(B, H, dtype=embed.dtype, device=dev)
    hg = torch.empty_like(x)
    rows = max(MAX_M, B)
    sq = torch.empty(1, rows, dtype=torch.float32, device=dev)
    cos = torch.empty(B, D, dtype=cos_table.dtype, device=dev)
    sin = torch.empty_like(cos)
    wblk = torch.empty(L, B, dtype=tables.dtype, device=dev)
    woff, lens = torch.empty_like(pos), torch.empty_like(pos)
    _prologue_kernel[(rows,)](ids, pos, embed, norm_weight, cos_table, sin_table, tables, x, hg, sq, cos, sin,
                              wblk, woff, lens, B, L, embed.stride(0), tables.stride(0), tables.stride(1),
                              x.stride(0), cos.stride(0), cos_table.stride(0), block_size,
                              H=H, D=D, BH=min(1024, _pow2(H)), LP=_pow2(L), num_warps=4)
    return x, hg, sq, cos, sin, wblk, woff, lens


def greedy_next(logits, live, ids, pos):
    """Greedy tokens nxt [B] (first maximum, as torch.argmax) of logits [B, V]; then, in
    place, ids = nxt * live and pos += live (padding rows, live 0, stay at token 0, position 0)."""
    if not _triton(logits):
        nxt = torch.argmax(logits, dim=-1)
        ids.copy_(nxt * live)
        pos.add_(live)
        return nxt
    from kernels.triton_decode_io import _greedy_kernel

    if logits.stride(1) != 1:
        raise ValueError("greedy_next needs unit stride along the vocabulary")
    B, V = logits.shape
    nxt = torch.empty(B, dtype=torch.int64, device=logits.device)
    _greedy_kernel[(B,)](logits, logits.stride(0), V, live, ids, pos, nxt, BV=4096, num_warps=8, num_stages=3)
    return nxt


def _pow2(n: int) -> int:  # triton.next_power_of_2, without importing triton here
    return 1 << max(0, int(n) - 1).bit_length()
