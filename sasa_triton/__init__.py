"""sasa-triton: Triton kernels for stand-alone self-attention in vision models.

`attend(q, k, v, kernel_size, ...)` is the op; `backends()` lists the implementations
this machine can run. Importing the package imports torch only: Triton, the kernels,
pandas and matplotlib load when first used.
"""
from .api import attend
from .variants import backends

__version__ = "0.1.0"
__all__ = ["attend", "backends", "nn", "__version__"]


def __getattr__(name: str):
    # `sasa_triton.nn` (modules) loads on first use, keeping `import sasa_triton` minimal
    if name == "nn":
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
