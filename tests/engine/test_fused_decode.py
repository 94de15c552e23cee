"""The CUDA decode path's Triton kernels, checked on the CPU through Triton's interpreter."""
import os
import subprocess
import sys

import pytest


def test_fused_decode_step_matches_piecewise_forward_under_triton_interpreter():
    pytest.importorskip("triton")
    import torch

    if torch.cuda.is_available():  # the compiled kernels run instead: test_gpu.py checks them against the same forward
        pytest.skip("a CUDA device is present; the compiled decode path is tested by test_gpu.py")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "tests.engine.fused_decode_check"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "fused decode matches" in r.stdout
