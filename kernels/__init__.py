"""DSLA math: torch reference forms and (on CUDA) fused Triton kernels.

Pure functions on tensors; nothing here knows about models, Ray or serving.
"""
from kernels.ops import dsla_decode, dsla_decode_slots, dsla_decode_step, dsla_prefill

__all__ = ["dsla_prefill", "dsla_decode", "dsla_decode_slots", "dsla_decode_step"]
