"""Every error class of the contract: the exception type, and a message naming the argument."""
import pytest
import torch

import sasa_triton

B, H, W, N, D = 1, 6, 6, 2, 8


def qkv(dtype=torch.float32, shape=(B, H, W, N, D)):
    return [torch.randn(shape).to(dtype) for _ in range(3)]


def rel(rows=3, cols=3, d=D):
    return dict(rel_h=torch.randn(rows, d // 2), rel_w=torch.randn(cols, d - d // 2))


def call(q=None, k=None, v=None, kernel_size=3, **kw):
    dq, dk, dv = qkv()
    return sasa_triton.attend(dq if q is None else q, dk if k is None else k,
                              dv if v is None else v, kernel_size, **kw)


BAD_CALLS = {
    "q-not-tensor": (TypeError, "q", lambda: call(q=[1.0])),
    "q-wrong-ndim": (ValueError, "q", lambda: call(q=torch.randn(B, H, W, N * D))),
    "k-wrong-ndim": (ValueError, "k", lambda: call(k=torch.randn(B, H, W, N * D))),
    "k-shape-differs": (ValueError, "k", lambda: call(k=torch.randn(B, H, W, N, 4))),
    "v-dtype-differs": (TypeError, "v", lambda: call(v=torch.randn(B, H, W, N, D).half())),
    "integer-dtype": (TypeError, "q", lambda: call(*[torch.ones(B, H, W, N, D, dtype=torch.int32)] * 3)),
    "complex-dtype": (TypeError, "q", lambda: call(*[torch.ones(B, H, W, N, D, dtype=torch.complex64)] * 3)),
    "kernel-even": (ValueError, "kernel_size", lambda: call(kernel_size=4)),
    "kernel-zero": (ValueError, "kernel_size", lambda: call(kernel_size=0)),
    "kernel-float": (TypeError, "kernel_size", lambda: call(kernel_size=3.0)),
    "kernel-bool": (TypeError, "kernel_size", lambda: call(kernel_size=True)),
    "kernel-triple": (ValueError, "kernel_size", lambda: call(kernel_size=(3, 3, 3))),
    "dilation-zero": (ValueError, "dilation", lambda: call(dilation=0)),
    "dilation-float": (TypeError, "dilation", lambda: call(dilation=(1, 1.5))),
    "padding-unknown": (ValueError, "padding", lambda: call(padding="reflect")),
    "shift-window-too-large": (ValueError, "shift", lambda: call(kernel_size=7, padding="shift")),
    "shift-dilated-too-large": (ValueError, "shift", lambda: call(dilation=(1, 3), padding="shift")),
    "rel-h-without-rel-w": (ValueError, "rel_w", lambda: call(rel_h=torch.randn(3, 4))),
    "rel-h-wrong-rows": (ValueError, "rel_h", lambda: call(**rel(rows=5))),
    "rel-w-wrong-width": (ValueError, "rel_w",
                          lambda: call(rel_h=torch.randn(3, 4), rel_w=torch.randn(3, 3))),
    "rel-shift-needs-2k-1": (ValueError, "rel_h", lambda: call(padding="shift", **rel())),
    "rel-per-head-wrong-heads": (ValueError, "rel_h", lambda: call(
        rel_h=torch.randn(N + 1, 3, 4), rel_w=torch.randn(N + 1, 3, 4))),
    "rel-dtype": (TypeError, "rel_h",
                  lambda: call(rel_h=torch.randn(3, 4).double(), rel_w=torch.randn(3, 4))),
    "rel-not-tensor": (TypeError, "rel_w", lambda: call(rel_h=torch.randn(3, 4), rel_w=[[0.0]])),
    "rel-needs-d-2": (ValueError, "d", lambda: call(*qkv(shape=(B, H, W, N, 1)),
                                                   rel_h=torch.randn(3, 0), rel_w=torch.randn(3, 1))),
    "rpb-wrong-shape": (ValueError, "rpb", lambda: call(rpb=torch.randn(N, 3, 3))),
    "rpb-dtype": (TypeError, "rpb", lambda: call(rpb=torch.randn(N, 5, 5).half())),
    "scale-string": (TypeError, "scale", lambda: call(scale="0.5")),
    "head-dim-too-large": (ValueError, "d", lambda: call(*qkv(shape=(1, 2, 2, 1, 512)))),
    "backend-unknown": (ValueError, "backend", lambda: call(backend="cuda-magic")),
    "backend-not-str": (TypeError, "backend", lambda: call(backend=3)),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_naming_the_argument(name):
    exc, word, fn = BAD_CALLS[name]
    with pytest.raises(exc, match=word):
        fn()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k"):
        sasa_triton.attend(q, k.cuda(), v, 3)
    with pytest.raises(ValueError, match="rpb"):
        sasa_triton.attend(q, k, v, 3, rpb=torch.randn(N, 5, 5, device="cuda"))


def test_device_mismatch_on_meta():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="v"):
        sasa_triton.attend(q, k, v.to("meta"), 3)
    with pytest.raises(ValueError, match="rel_h"):
        sasa_triton.attend(q, k, v, 3, rel_h=torch.randn(3, 4, device="meta"), rel_w=torch.randn(3, 4))


def test_backends_lists_auto_and_reference():
    names = sasa_triton.backends("cpu")
    assert names[0] == "auto" and "reference" in names
