"""Convolution backward on NHWC tensors: input gradient (dgrad) and weight gradient (wgrad).

Forward (see ``conv.py``): y[n, p, q, k] = sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw,
g*C_g + c] * w[(r*S + s)*C_g + c, k], with g = k // K_g. Given dy (N, P, Q, K):

  dgrad  dx[n, h, v, g*C_g + c] = sum_{r,s,k in group g} dy[n, p, q, k] * w[(r*S + s)*C_g + c, k]
         over the taps where p = (h + ph - r*dh) / sh and q = (v + pw - s*dw) / sw are integers
         inside the output. Implicit GEMM: M = N*H*W input pixels, N = C_g, reduction over
         taps then output channels of the group (masked loads skip non-landing taps).
  wgrad  dw[(r*S + s)*C_g + c, k] = sum_{n,p,q} x[n, ih, iw, g*C_g + c] * dy[n, p, q, k]
         One tile per (tap, C_g block, K_g block, group, split): split-K over M = N*P*Q
         output pixels into fp32 partials (SPLIT, R*S*C_g, K), then summed over splits in a
         fixed order (no atomics: deterministic).

Both accumulate in fp32; dx is rounded once to x's dtype.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .configs import SMALL_M, ConvConfig, _pow2_at_least, interpreting, pick_config
from .conv import INT32_SAFE, _mma, tile_ids

WGRAD_PROGRAMS = 2 * 132  # split-K target: two programs per H100/H200 SM


def dgrad_config(m: int, c_per_group: int, k_per_group: int,
                 elem_bytes: int = 4) -> ConvConfig:
    """dgrad tiles: M = input pixels, N = input channels, K chunks of output channels of
    ``elem_bytes`` each."""
    if interpreting():
        return pick_config(m, c_per_group, k_per_group)
    return _dgrad_gpu_config(m, c_per_group, k_per_group, elem_bytes)


def _dgrad_gpu_config(m: int, c_per_group: int, k_per_group: int,
                      elem_bytes: int) -> ConvConfig:
    """K chunks of at most 128 bytes (64 bf16/fp16, 32 fp32: one swizzled shared-memory row),
    BLOCK_N up to 128, 8 warps from 128x64 tiles up, 3 stages (at most 96 KiB): every such
    config compiles for sm_90a to HGMMA without spilling in bf16, fp16 and tf32, int64
    indexing included (``python -m fastres.aot``)."""
    bn = _pow2_at_least(c_per_group, 16, 128)
    bk = _pow2_at_least(k_per_group, 16, 128 // elem_bytes)
    bm = 128 if m >= SMALL_M and bn >= 64 else 64
    return ConvConfig(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if bm * bn >= 8192 else 4,
                      num_stages=3)


def all_dgrad_configs(elem_bytes: Optional[int] = None) -> list:
    """Every config ``dgrad_config`` can return on a GPU for a dtype of ``elem_bytes`` bytes
    (both sizes when None): the set the ahead-of-time check (``python -m fastres.aot``)
    compiles."""
    out = []
    for e in ((2, 4) if elem_bytes is None else (elem_bytes,)):
        for m in (1, SMALL_M):
            for c in (16, 32, 64, 128, 256):
                for k in (16, 32, 64, 128):
                    cfg = _dgrad_gpu_config(m, c, k, e)
                    if cfg not in out:
                        out.append(cfg)
    return out


def wgrad_blocks(m: int, c_per_group: int, k_per_group: int) -> dict:
    """wgrad tiles: (BLOCK_C input channels of one tap) x (BLOCK_N output channels), the
    reduction over output pixels in chunks of BLOCK_M."""
    if interpreting():
        return dict(BLOCK_C=_pow2_at_least(c_per_group, 16, 64),
                    BLOCK_N=_pow2_at_least(k_per_group, 16, 64),
                    BLOCK_M=_pow2_at_least(m, 16, 128), num_warps=1, num_stages=1)
    return _wgrad_gpu_blocks(c_per_group, k_per_group)


def _wgrad_gpu_blocks(c_per_group: int, k_per_group: int) -> dict:
    return dict(BLOCK_C=_pow2_at_least(c_per_group, 16, 64),
                BLOCK_N=_pow2_at_least(k_per_group, 16, 128), BLOCK_M=32, num_warps=4,
                num_stages=3)


def all_wgrad_blocks() -> list:
    """Every tile ``wgrad_blocks`` can return on a GPU: the set the ahead-of-time check
    compiles."""
    out = []
    for c in (16, 32, 64, 128):
        for k in (16, 32, 64, 128, 256):
            blocks = _wgrad_gpu_blocks(c, k)
            if blocks not in out:
                out.append(blocks)
    return out


@triton.jit(do_not_specialize=["M"])
def conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    H, W, C, P, Q, M, K, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    g = tl.program_id(1)
    pid_m, pid_n = tile_ids(M, C_G, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_c = offs_c < C_G
    if INT64:
        offs_m = offs_m.to(tl.int64)
    img = offs_m // (H * W)
    h = (offs_m // W) % H
    v = offs_m % W

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        hp = h + pad_h - r * dil_h
        p = hp // stride_h
        ok_h = (hp >= 0) & (hp % stride_h == 0) & (p < P)
        for s in range(S):
            vq = v + pad_w - s * dil_w
            q = vq // stride_w
            ok = mask_m & ok_h & (vq >= 0) & (vq % stride_w == 0) & (q < Q)
            dy_row = ((img * P + p) * Q + q) * K + g * K_G
            w_row = (r * S + s) * C_G
            for k0 in range(0, K_G, BLOCK_K):
                ks = k0 + offs_k
                k_ok = ks < K_G
                a = tl.load(dy_ptr + dy_row[:, None] + ks[None, :],
                            mask=ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_ptr + (w_row + offs_c)[None, :] * K + (g * K_G + ks)[:, None],
                            mask=k_ok[:, None] & mask_c[None, :], other=0.0)
                acc = _mma(a, b, acc, UPCAST, PRECISION)

    tl.store(dx_ptr + offs_m[:, None] * C + (g * C_G + offs_c)[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit(do_not_specialize=["M"])
def conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    H, W, C, P, Q, M, K, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M_PER_SPLIT, RSC,
    S: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    num_c = tl.cdiv(C_G, BLOCK_C)
    num_n = tl.cdiv(K_G, BLOCK_N)
    tap = pid // (num_c * num_n)
    pid_c = (pid // num_n) % num_c
    pid_n = pid % num_n
    r = tap // S
    s = tap % S

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < C_G
    mask_n = offs_n < K_G
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    m_start = split * M_PER_SPLIT
    for m0 in range(m_start, min(m_start + M_PER_SPLIT, M), BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if INT64:
            offs_m = offs_m.to(tl.int64)
        mask_m = offs_m < M
        img = offs_m // (P * Q)
        p = (offs_m // Q) % P
        q = offs_m % Q
        ih = p * stride_h - pad_h + r * dil_h
        iw = q * stride_w - pad_w + s * dil_w
        pix_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = ((img * H + ih) * W + iw) * C + g * C_G
        a = tl.load(x_ptr + x_row[None, :] + offs_c[:, None],
                    mask=mask_c[:, None] & pix_ok[None, :], other=0.0)
        b = tl.load(dy_ptr + offs_m[:, None] * K + (g * K_G + offs_n)[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST, PRECISION)

    tl.store(dw_ptr + split * RSC * K + (tap * C_G + offs_c)[:, None] * K
             + (g * K_G + offs_n)[None, :], acc, mask=mask_c[:, None] & mask_n[None, :])


@triton.jit
def sum_splits_kernel(part_ptr, out_ptr, SPLIT, NUMEL, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i], s in order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


def _precision(dtype, allow_tf32):
    return ("tf32" if allow_tf32 else "ieee") if dtype == torch.float32 else None


def conv_dgrad(dy, w, x_shape, *, kernel_size, stride, padding, dilation, groups,
               allow_tf32=True):
    """dx (N, C, H, W) channels_last in dy's dtype. dy: (N, K, P, Q) channels_last-dense;
    w: (R*S*C/groups, K) contiguous, the forward's kernel-layout weights."""
    n, c, h, wd = x_shape
    _, k, p, q = dy.shape
    dx = torch.empty((n, c, h, wd), dtype=dy.dtype, device=dy.device,
                     memory_format=torch.channels_last)
    m = n * h * wd
    if m == 0 or c == 0:
        return dx
    c_g, k_g = c // groups, k // groups
    cfg = dgrad_config(m, c_g, k_g, dy.element_size())
    grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(c_g, cfg.BLOCK_N), groups)
    conv_dgrad_kernel[grid](
        dy, w, dx, h, wd, c, p, q, m, k, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=kernel_size[0], S=kernel_size[1], INT64=max(dx.numel(), dy.numel()) > INT32_SAFE,
        UPCAST=interpreting() and dy.dtype == torch.bfloat16,
        PRECISION=_precision(dy.dtype, allow_tf32), **cfg.kwargs())
    return dx


def conv_wgrad(x, dy, *, kernel_size, stride, padding, dilation, groups, allow_tf32=True,
               split=None):
    """dw (R*S*C/groups, K) fp32 in the kernel's weight layout. x: (N, C, H, W) and dy:
    (N, K, P, Q), both channels_last-dense and of one dtype. ``split``: split-K factor over
    the output pixels (default: enough programs to fill the GPU)."""
    n, c, h, wd = x.shape
    _, k, p, q = dy.shape
    r, s = kernel_size
    c_g, k_g = c // groups, k // groups
    m = n * p * q
    if m == 0:
        return torch.zeros((r * s * c_g, k), dtype=torch.float32, device=x.device)
    dw = torch.empty((r * s * c_g, k), dtype=torch.float32, device=x.device)
    blocks = wgrad_blocks(m, c_g, k_g)
    tiles = r * s * triton.cdiv(c_g, blocks["BLOCK_C"]) * triton.cdiv(k_g, blocks["BLOCK_N"])
    chunks = triton.cdiv(m, blocks["BLOCK_M"])
    if split is None:
        split = 1 if interpreting() else \
            max(1, min(triton.cdiv(WGRAD_PROGRAMS, tiles * groups), chunks // 8))
    per_split = triton.cdiv(chunks, split) * blocks["BLOCK_M"]
    split = triton.cdiv(m, per_split)
    part = dw if split == 1 else torch.empty((split, r * s * c_g, k), dtype=torch.float32,
                                             device=x.device)
    conv_wgrad_kernel[(tiles, groups, split)](
        x, dy, part, h, wd, c, p, q, m, k, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        per_split, r * s * c_g,
        S=s, INT64=max(x.numel(), dy.numel()) > INT32_SAFE,
        UPCAST=interpreting() and x.dtype == torch.bfloat16,
        PRECISION=_precision(x.dtype, allow_tf32), **blocks)
    if split > 1:
        sum_splits_kernel[(triton.cdiv(dw.numel(), 1024),)](part, dw, split, dw.numel(),
                                                             BLOCK=1024)
    return dw
