"""Comparison against references, with the tolerance table of the project:
fp32 within 1e-6 relative to the reference's largest magnitude; fp16/bf16 within `ulps` units in the last
place of the output type, element by element, except where the fp32 arithmetic's own error (the fp32 bound)
exceeds that ulp: near zero after cancellation, a kernel that rounds or fuses differently in fp32 may land a
few tiny half-type ulps away."""

import torch

FP32_RTOL = 1e-6


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in representable values of a 16-bit float type (sign-magnitude bits to a line)."""
    assert a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)

    def ordered(t):
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, *, ulps: int = 1, rtol: float = FP32_RTOL):
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.cpu(), expected.cpu()
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), "NaN where the reference has none: an element was not written?"
    actual, expected = actual[~nan], expected[~nan]
    if actual.numel() == 0:
        return
    if actual.dtype in (torch.float16, torch.bfloat16):
        dist = ulp_distance(actual, expected)
        fp32_close = (actual.float() - expected.float()).abs() <= rtol * expected.float().abs().max()
        worst = int(dist[~fp32_close].max()) if (~fp32_close).any() else 0
        assert worst <= ulps, f"{worst} ulps apart (allowed {ulps})"
    else:
        scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
        err = float((actual - expected).abs().max() / scale)
        assert err <= rtol, f"relative error {err:.3g} > {rtol:g}"
