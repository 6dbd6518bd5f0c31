"""The score networks' fused paths against plain PyTorch: GroupNormSiLU in channels_last against F.group_norm, and
a torch.compile'd U-Net block (what compile=True trains) against the eager one, forward and gradients."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from genmodels.networks.convnets import GroupNormSiLU
from genmodels.networks.unet import NoiseResBlock


def _grads(fn, *tensors):
    out = fn()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a loss that weighs every output
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


def test_group_norm_silu_in_channels_last_matches_group_norm():
    torch.manual_seed(0)
    norm = GroupNormSiLU(4, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(3, 16, 8, 8) * 3 + 1).to(memory_format=torch.channels_last).requires_grad_()
    got, got_grads = _grads(lambda: norm(x), x, norm.weight, norm.bias)
    assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()  # no NCHW copy out
    want, want_grads = _grads(lambda: F.silu(F.group_norm(x.contiguous(), 4, norm.weight, norm.bias, norm.eps)),
                              x, norm.weight, norm.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                    reason="torch.compile on a CPU needs a C compiler")
def test_compiled_unet_block_matches_eager_in_channels_last():
    memory_format = torch.channels_last  # the GPU's layout, where GroupNormSiLU takes its own path
    torch.manual_seed(0)
    block = NoiseResBlock(16, 32, emb_dim=24).to(memory_format=memory_format)
    with torch.no_grad():
        block.conv2.weight.normal_(0, 0.05)  # the residual branch starts at zero: give it something to check
    x = torch.randn(4, 16, 8, 8).to(memory_format=memory_format).requires_grad_()
    emb = torch.randn(4, 24)
    params = [x, *block.parameters()]
    want, want_grads = _grads(lambda: block(x, emb), *params)
    compiled = torch.compile(block)
    got, got_grads = _grads(lambda: compiled(x, emb), *params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)
