"""Where a Triton kernel test runs: compiled on CUDA, or through Triton's interpreter on CPU
(conftest.py turns it on there). Importing this skips the importing test module when neither
is available."""
import os

import pytest
import torch

pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if not CUDA and not INTERPRET:
    pytest.skip("no CUDA and the Triton interpreter is off", allow_module_level=True)
