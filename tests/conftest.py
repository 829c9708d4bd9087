import os
import sys

# Kernels run through Triton's interpreter on CPU-only machines; it must be set before
# triton is imported. With a GPU, the real compiler runs (unset it to test that).
if os.environ.get("SASA_TEST_REAL_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
