"""The alignment rule behind the kernels' vector-load hints (kernels.common.vector_width):
a wrong answer would not fail the interpreter tests (hints are ignored there) but would
make misaligned vector loads on a GPU."""
import torch

from sasa_triton.kernels.common import vector_width


def test_contiguous_heads_last_rows_vectorise_by_the_head_dim():
    q = torch.empty(2, 5, 7, 8, 8, dtype=torch.bfloat16)
    assert vector_width((q, q), 8) == 8
    assert vector_width((torch.empty(2, 5, 7, 3, 12),), 16) == 4  # head stride 12
    assert vector_width((torch.empty(2, 5, 7, 3, 5),), 8) == 1


def test_views_lower_the_width_to_what_every_offset_divides():
    buf = torch.empty(2, 5, 7, 8, 16)
    assert vector_width((buf,), 16) == 16
    assert vector_width((buf[..., :8],), 8) == 8  # head stride 16, d 8
    shifted = torch.empty(2 + buf.numel())[2:].view(buf.shape)
    assert vector_width((buf, shifted), 16) == 2  # base address 2 elements in
    proj = torch.empty(2, 3 * 64, 5, 7)  # NCHW projection viewed heads-last: d strided
    nchw = proj.unflatten(1, (3, 8, 8)).permute(1, 0, 4, 5, 2, 3)[0]
    assert nchw.shape == (2, 5, 7, 8, 8) and vector_width((nchw,), 8) == 1
    cl = proj.contiguous(memory_format=torch.channels_last)
    k = cl.unflatten(1, (3, 8, 8)).permute(1, 0, 4, 5, 2, 3)[1]  # pixel stride 192, base 64
    assert vector_width((k,), 8) == 8
