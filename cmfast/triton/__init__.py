"""Triton kernels and their launchers, one module per op. Imported lazily: only when the Triton backend runs."""

# Every launch states FP fusion (a * b + c as one FMA) rather than inheriting Triton's default, which Triton 3.9 warns
# will turn off in 3.10: the kernels are written for FMAs, as nvcc gives the CUDA kernels by default.
FP_FUSION = True


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 are ConstexprFunction
# objects in Triton 3.9 (callable in kernels too) at ~1.9 us a call, a fair part of a small launch's host time.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
