"""Triton kernels of the `group_norm` op (see cmfast/ops/group_norm.py for the contract).

Group g of sample b (a "pair") is a (channels_per_group, S) matrix of x, S = prod(spatial) pixels, with strides
(S, 1) when x is contiguous and (1, C) when it is 4-d channels_last (a pixel's channels of the group are
adjacent); programs read it in [BLOCK_C, BLOCK_S] tiles, long along the axis that is contiguous in memory.
Statistics are fp32 and stay exact for groups of 100k elements and any offset of the data: a group that fits
one tile gets two-pass statistics in registers; a larger one is summed per lane as x - shift (shift: the mean of
the program's first tile, so no cancellation), the lanes reduced to (count, mean, M2), parts merged with Chan's
formula.

  _packed_kernel            groups that fit one tile, PAIRS of them per program: one read of x.
  _normalize_kernel         one program per (pair, part): statistics of the whole group (one part), or the
                            merge of the parts' statistics; then normalise + epilogue (a second read of x).
  _partial_stats_kernel     for few pairs (small batch, large groups): (count, mean, M2) of each part of a
                            group, into a workspace that _normalize_kernel merges.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import FP_FUSION, cdiv, interpreted, next_power_of_2, sm_count

BLOCK = 4096  # elements per tile: groups up to this size are normalised from registers, in one read
ELEMENTS_PER_THREAD = 16  # num_warps = tile / (32 * this), 1 to 8: four 16-byte loads per thread in flight
PROGRAMS_PER_SM = 4  # packing small groups or splitting large ones aims at about this many programs per SM
MIN_SPLIT_ELEMENTS = 2048  # smallest part of a split group: below it the extra launch and merge dominate
SM_COUNT_INTERPRETED = 1  # the interpreter runs programs one by one in Python: fewest programs (no split, most packing)


@triton.jit
def _rstd(count, m2, eps):
    return tl.div_rn(1.0, tl.sqrt_rn(tl.maximum(m2, 0.0) / count + eps))


@triton.jit
def _coefficients(channel, sample_channel, mask, rstd, w_ptr, b_ptr, scale_ptr, shift_ptr,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(a, b) with y = (x - mean) * a + b: rstd, the affine and the modulation folded together per channel;
    channel / sample_channel index (C,) / (batch, C)."""
    a = tl.zeros(channel.shape, dtype=tl.float32) + rstd
    b = tl.zeros(channel.shape, dtype=tl.float32)
    if HAS_W:  # an absent parameter is None: only its flag's branch names it
        a *= tl.load(w_ptr + channel, mask=mask, other=0.0)
    if HAS_B:
        b += tl.load(b_ptr + channel, mask=mask, other=0.0)
    if HAS_SCALE:
        factor = 1.0 + tl.load(scale_ptr + sample_channel, mask=mask, other=0.0)
        a *= factor
        b *= factor
    if HAS_SHIFT:
        b += tl.load(shift_ptr + sample_channel, mask=mask, other=0.0)
    return a, b


@triton.jit
def _epilogue(y, SILU: tl.constexpr):
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    return y


@triton.jit
def _packed_kernel(x_ptr, out_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, pairs, groups, cpg, S,
                   stride_b, stride_c, stride_s, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                   SILU: tl.constexpr, PAIRS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pair = tl.program_id(0) * PAIRS + tl.arange(0, PAIRS)[:, None, None]
    c = tl.arange(0, BLOCK_C)[None, :, None]
    s = tl.arange(0, BLOCK_S)[None, None, :]
    channel = (pair % groups) * cpg + c
    offs = (pair // groups).to(tl.int64) * stride_b + channel * stride_c + s * stride_s
    in_group = (pair < pairs) & (c < cpg)
    mask = in_group & (s < S)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    count = 1.0 * cpg * S  # not .to(): cpg and S may be constexpr (Triton specialises ints equal to 1)
    mean = tl.sum(tl.sum(x, axis=2), axis=1)[:, None, None] / count
    d = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=2), axis=1)[:, None, None]
    a, b = _coefficients(channel, pair * cpg + c, in_group, _rstd(count, m2, eps), w_ptr, b_ptr, scale_ptr, shift_ptr,
                         HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
    tl.store(out_ptr + offs, _epilogue(d * a + b, SILU).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, stride_c, stride_s):
    """Channel and pixel indices ([BLOCK_C, 1], [1, BLOCK_S]) of a tile of one group, and its element offsets."""
    c = tl.arange(0, BLOCK_C)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    return c, s, c * stride_c + s * stride_s


@triton.jit
def _group(pair, groups, cpg, stride_b, stride_c):
    """Offset of (sample, group) `pair` in x, and of its first channel in (C,)."""
    channel = (pair % groups) * cpg
    return (pair // groups).to(tl.int64) * stride_b + channel * stride_c, channel


@triton.jit
def _part_stats(x_ptr, cpg, pixels, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) in fp32 of the group's pixels [0, pixels) from x_ptr."""
    c, s, offs = _tile(BLOCK_C, BLOCK_S, stride_c, stride_s)
    first = tl.load(x_ptr + offs, mask=(c < cpg) & (s < pixels), other=0.0).to(tl.float32)
    shift = tl.sum(first) / (1.0 * tl.minimum(cpg, BLOCK_C) * tl.minimum(pixels, BLOCK_S))
    sum1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)
    for c0 in range(0, cpg, BLOCK_C):
        for s0 in range(0, pixels, BLOCK_S):
            mask = (c < cpg - c0) & (s < pixels - s0)
            x = tl.load(x_ptr + (c0 * stride_c + s0 * stride_s) + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, x - shift, 0.0)
            sum1 += d
            sum2 += d * d
    count = 1.0 * cpg * pixels
    s1 = tl.sum(sum1)
    return count, shift + s1 / count, tl.sum(sum2) - s1 * (s1 / count)


@triton.jit
def _partial_stats_kernel(x_ptr, parts_ptr, groups, cpg, S, pixels_per_part, stride_b, stride_c, stride_s,
                          BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pair = tl.program_id(0)
    part = tl.program_id(1)
    offset, _ = _group(pair, groups, cpg, stride_b, stride_c)
    s_begin = part * pixels_per_part
    count, mean, m2 = _part_stats(x_ptr + offset + s_begin * stride_s, cpg, tl.minimum(pixels_per_part, S - s_begin),
                                  stride_c, stride_s, BLOCK_C, BLOCK_S)
    slot = parts_ptr + (pair * tl.num_programs(1) + part) * 3
    tl.store(slot, count)
    tl.store(slot + 1, mean)
    tl.store(slot + 2, m2)


@triton.jit
def _normalize_kernel(x_ptr, out_ptr, parts_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, groups, cpg, S, pixels_per_part,
                      stride_b, stride_c, stride_s, eps,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                      SILU: tl.constexpr, PARTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    pair = tl.program_id(0)
    part = tl.program_id(1)
    offset, channel = _group(pair, groups, cpg, stride_b, stride_c)
    if PARTS == 1:
        count, mean, m2 = _part_stats(x_ptr + offset, cpg, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
    else:  # Chan's merge of the parts: M2 = sum(M2_p + n_p * (mean_p - mean)^2)
        p = tl.arange(0, PARTS)
        valid = p < tl.num_programs(1)
        slots = parts_ptr + (pair * tl.num_programs(1) + p) * 3
        n = tl.load(slots, mask=valid, other=0.0)
        part_mean = tl.load(slots + 1, mask=valid, other=0.0)
        count = 1.0 * cpg * S
        mean = tl.sum(n * part_mean) / count
        m2 = tl.sum(tl.load(slots + 2, mask=valid, other=0.0) + n * (part_mean - mean) * (part_mean - mean))
    rstd = _rstd(count, m2, eps)
    s_begin = part * pixels_per_part
    pixels = tl.minimum(pixels_per_part, S - s_begin)
    c, s, offs = _tile(BLOCK_C, BLOCK_S, stride_c, stride_s)
    offs += offset + s_begin * stride_s
    for c0 in range(0, cpg, BLOCK_C):
        a, b = _coefficients(channel + c0 + c, pair * cpg + c0 + c, c < cpg - c0, rstd, w_ptr, b_ptr, scale_ptr,
                             shift_ptr, HAS_W, HAS_B, HAS_SCALE, HAS_SHIFT)
        for s0 in range(0, pixels, BLOCK_S):
            mask = (c < cpg - c0) & (s < pixels - s0)
            tile = (c0 * stride_c + s0 * stride_s) + offs
            x = tl.load(x_ptr + tile, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + tile, _epilogue((x - mean) * a + b, SILU).to(out_ptr.dtype.element_ty), mask=mask)


def _group_strides(t: torch.Tensor) -> tuple[int, int]:
    """(channel, pixel) strides of a group of t: contiguous (S, 1), 4-d channels_last (1, C)."""
    if t.is_contiguous():
        return t[0, 0].numel(), 1
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return 1, t.shape[1]
    raise ValueError(f"x: expected a contiguous or 4-d channels_last tensor, got strides {t.stride()}")


def _tile_shape(cpg: int, pixels: int, channels_last: bool) -> tuple[int, int]:
    """[BLOCK_C, BLOCK_S] of BLOCK elements at most, long along the axis that is contiguous in memory."""
    if channels_last:  # all the group's channels of a pixel, as many pixels as fit
        block_c = min(next_power_of_2(cpg), BLOCK)
        return block_c, min(BLOCK // block_c, next_power_of_2(pixels))
    block_s = min(next_power_of_2(pixels), BLOCK)
    return min(next_power_of_2(cpg), BLOCK // block_s), block_s


def _num_warps(elements: int) -> int:
    return min(max(elements // (32 * ELEMENTS_PER_THREAD), 1), 8)


def group_norm(x, weight, bias, scale, shift, num_groups, eps, silu, out):
    if x.numel() == 0:
        return
    batch, channels = x.shape[:2]
    cpg, S = channels // num_groups, x[0, 0].numel()
    stride_c, stride_s = _group_strides(x)
    if _group_strides(out) != (stride_c, stride_s):
        raise ValueError(f"out: expected the layout of x (strides {x.stride()}), got strides {out.stride()}")
    channels_last = stride_c == 1 and S > 1
    pairs = batch * num_groups
    sms = SM_COUNT_INTERPRETED if interpreted() else sm_count(x.device)
    programs = PROGRAMS_PER_SM * sms
    strides = (channels * S, stride_c, stride_s)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
                 HAS_SHIFT=shift is not None, SILU=bool(silu))
    block_c, block_s = _tile_shape(cpg, S, channels_last)
    if block_c >= cpg and block_s >= S:  # the group fits a tile: pack pairs while enough programs remain
        pack = max(min(BLOCK // (block_c * block_s), pairs // programs), 1)
        pack = 1 << (pack.bit_length() - 1)
        _packed_kernel[(cdiv(pairs, pack),)](
            x, out, weight, bias, scale, shift, pairs, num_groups, cpg, S, *strides, eps, **flags,
            PAIRS=pack, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_num_warps(pack * block_c * block_s),
            enable_fp_fusion=FP_FUSION,
        )
        return
    # Few pairs of large groups: split each group's pixels into parts, none under MIN_SPLIT_ELEMENTS.
    parts = min(cdiv(programs, pairs), cdiv(cpg * S, MIN_SPLIT_ELEMENTS)) if pairs < sms else 1
    pixels_per_part = next_power_of_2(cdiv(S, parts))  # aligned parts, whole tiles
    parts = cdiv(S, pixels_per_part)  # none empty
    block_c, block_s = _tile_shape(cpg, pixels_per_part, channels_last)
    tile = dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=_num_warps(block_c * block_s), enable_fp_fusion=FP_FUSION)
    workspace = None
    if parts > 1:
        workspace = torch.empty((pairs, parts, 3), dtype=torch.float32, device=x.device)
        _partial_stats_kernel[(pairs, parts)](x, workspace, num_groups, cpg, S, pixels_per_part, *strides, **tile)
    _normalize_kernel[(pairs, parts)](x, out, workspace, weight, bias, scale, shift, num_groups, cpg, S,
                                      pixels_per_part, *strides, eps, **flags, PARTS=next_power_of_2(parts),
                                      **tile)
