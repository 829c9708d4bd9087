import os
import sys
from importlib import metadata

import pytest

# Kernels run through Triton's interpreter on CPU-only machines; it must be set before
# triton is imported. With a GPU, the real compiler runs (unset it to test that).
if os.environ.get("SASA_TEST_REAL_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))


def _version(package):
    try:
        return tuple(int(x) for x in metadata.version(package).split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return None


def pytest_configure(config):
    # Triton < 3.7's interpreter reads scalars with int(1-element array), which numpy
    # >= 2.4 rejects: every kernel loop over a runtime bound would fail obscurely.
    triton, numpy = _version("triton"), _version("numpy")
    if (os.environ.get("TRITON_INTERPRET") == "1" and triton and numpy
            and triton < (3, 7) and numpy >= (2, 4)):
        raise pytest.UsageError(f"Triton {metadata.version('triton')}'s interpreter needs "
                                f"numpy < 2.4 (found {metadata.version('numpy')}): "
                                "pip install 'numpy<2.4'")


def pytest_collection_modifyitems(config, items):
    # `@pytest.mark.gpu` tests need a CUDA device: skipped (with the reason) without one;
    # `pytest -m gpu` runs just them, `-m "not gpu"` everything else.
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu marker: needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
