"""The score networks' norms against plain PyTorch, forward and gradients, in both memory layouts: GroupNormSiLU
against F.group_norm, CondInstanceNorm++ against NCSN's formula, in fp32 and under bf16 autocast (as training runs
them), on the CPU and on CUDA (where the GPU check's call 1 runs this file); and a torch.compile'd U-Net block (what
compile=True trains) against the eager one."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from genmodels.networks.convnets import GroupNormSiLU
from genmodels.networks.refinenet import CondInstanceNormPlus
from genmodels.networks.unet import NoiseResBlock

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
LAYOUTS = [torch.channels_last, torch.contiguous_format]


def _grads(fn, *tensors):
    out = fn()
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a loss that weighs every output
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_group_norm_silu_matches_group_norm_in_either_layout(memory_format):
    torch.manual_seed(0)
    norm = GroupNormSiLU(4, 16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(3, 16, 8, 8) * 3 + 1).to(memory_format=memory_format).requires_grad_()
    got, got_grads = _grads(lambda: norm(x), x, norm.weight, norm.bias)
    assert got.is_contiguous(memory_format=memory_format)  # written in x's layout: no NCHW copy out
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


def _cond_instance_norm_plus_reference(norm, x, levels):
    """The formula as NCSN's code release writes it: instance norm, then the "++" term, then the affine map."""
    means = x.mean(dim=(2, 3))
    m, v = means.mean(dim=1, keepdim=True), means.var(dim=1, keepdim=True)
    means = (means - m) / torch.sqrt(v + 1e-5)
    h = F.instance_norm(x, eps=1e-5)
    gamma, alpha, beta = norm.embed(levels).chunk(3, dim=1)
    h = h + means[:, :, None, None] * alpha[:, :, None, None]
    return gamma[:, :, None, None] * h + beta[:, :, None, None]


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_cond_instance_norm_plus_matches_the_reference_formula(memory_format):
    torch.manual_seed(0)
    norm = CondInstanceNormPlus(8, num_levels=5)
    with torch.no_grad():
        norm.embed.weight.normal_()
    x = (torch.randn(3, 8, 6, 6) * 2 + torch.randn(3, 8, 1, 1) * 4).to(memory_format=memory_format).requires_grad_()
    levels = torch.tensor([0, 4, 2])
    got, got_grads = _grads(lambda: norm(x, levels), x, norm.embed.weight)
    assert got.is_contiguous(memory_format=memory_format)
    want, want_grads = _grads(lambda: _cond_instance_norm_plus_reference(norm, x.contiguous(), levels),
                              x, norm.embed.weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _bf16_input(shape, device, memory_format, offset):
    """A bf16 tensor as a bf16 convolution hands it to the norm: values with an offset that bf16 statistics would
    lose (a variance of 9 around a mean of `offset`), in the given layout, a leaf that takes gradients."""
    x = torch.randn(shape, device=device) * 3 + offset
    return x.to(torch.bfloat16).to(memory_format=memory_format).requires_grad_()


def _assert_close_in_dtype(got, want, what):
    """fp32 results (statistics and output in fp32 from the same bf16 input) agree to fp32's reduction order; a bf16
    result to its rounding. Gradients to a share of their largest value."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=what)
    else:
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-3, msg=what)


def _assert_grads_close(got_grads, want_grads):
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(g.float(), w.float(), rtol=1.6e-2, atol=1e-2 * float(w.float().abs().max()),
                                   msg=f"gradient {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_group_norm_silu_matches_group_norm_under_bf16_autocast(device, memory_format):
    """As a U-Net block runs it in training: a bf16 input under bf16 autocast. The result against fp32 F.group_norm
    of the same bf16 values, and the same dtype as F.group_norm under that autocast (fp32 on CUDA)."""
    torch.manual_seed(0)
    norm = GroupNormSiLU(8, 32).to(device)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = _bf16_input((4, 32, 8, 8), device, memory_format, offset=10.0)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, got_grads = _grads(lambda: norm(x), x, norm.weight, norm.bias)
        autocast_dtype = F.group_norm(x.detach().contiguous(), 8, norm.weight, norm.bias, norm.eps).dtype
    assert got.is_contiguous(memory_format=memory_format)
    if device == "cuda":
        assert got.dtype == autocast_dtype == torch.float32  # nn.GroupNorm's dtype there: nothing else changes
    want, want_grads = _grads(lambda: F.silu(F.group_norm(x.float().contiguous(), 8, norm.weight, norm.bias,
                                                          norm.eps)), x, norm.weight, norm.bias)
    _assert_close_in_dtype(got, want, f"GroupNormSiLU on {device}")
    _assert_grads_close(got_grads, want_grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_cond_instance_norm_plus_matches_the_reference_formula_under_bf16_autocast(device, memory_format):
    """As RefineNet runs it in training: a bf16 input under bf16 autocast, a bf16 result; against NCSN's formula in
    fp32 on the same bf16 values, per-channel means far apart (what the "++" term carries)."""
    torch.manual_seed(0)
    norm = CondInstanceNormPlus(16, num_levels=5).to(device)
    with torch.no_grad():
        norm.embed.weight.normal_()
    x = _bf16_input((4, 16, 8, 8), device, memory_format, offset=0.0)
    with torch.no_grad():
        x += (torch.randn(4, 16, 1, 1, device=device) * 4 + 10).to(torch.bfloat16)
    levels = torch.tensor([0, 4, 2, 1], device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, got_grads = _grads(lambda: norm(x, levels), x, norm.embed.weight)
    assert got.is_contiguous(memory_format=memory_format) and got.dtype == torch.bfloat16
    want, want_grads = _grads(lambda: _cond_instance_norm_plus_reference(norm, x.float().contiguous(), levels),
                              x, norm.embed.weight)
    _assert_close_in_dtype(got, want, f"CondInstanceNormPlus on {device}")
    _assert_grads_close(got_grads, want_grads)
