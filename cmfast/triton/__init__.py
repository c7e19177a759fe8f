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


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1, read by Triton at import) instead of compiling."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device) -> int:
    """The GPU's multiprocessor count (cached per device: a property lookup per launch adds up)."""
    if device not in _SM_COUNTS:
        import torch

        _SM_COUNTS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[device]


_SM_COUNTS: dict = {}
