"""Convolution backward on NHWC tensors: input gradient (dgrad) and weight gradient (wgrad).

Forward (see ``conv.py``, which also states the weight layout: (K, C_g, R, S) in channels_last
memory): y[n, p, q, k] = sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, g*C_g + c]
* w[k, c, r, s], with g = k // K_g. Given dy (N, P, Q, K):

  dgrad  dx[n, h, v, g*C_g + c] = sum_{r,s,k in group g} dy[n, p, q, k] * w[k, c, r, s]
         over the taps where p = (h + ph - r*dh) / sh and q = (v + pw - s*dw) / sw are integers
         inside the output. Implicit GEMM: M = N*H*W input pixels, N = C_g, reduction over
         taps then output channels of the group (masked loads skip non-landing taps).
  wgrad  dw[k, c, r, s] = sum_{n,p,q} x[n, ih, iw, g*C_g + c] * dy[n, p, q, k], stored in the
         weight layout (OHWI). One tile per (tap, C_g block, K_g block, group, split):
         split-K over M = N*P*Q output pixels into fp32 partials (SPLIT, K, R, S, C_g), then
         summed over splits in a fixed order (no atomics: deterministic).

Both accumulate in fp32; dx is rounded once to x's dtype, dw stays fp32.
"""
import torch
import triton
import triton.language as tl

from .configs import dgrad_config, gpu_sms, wgrad_blocks, wgrad_split
from .conv import _mma, dot_flags, needs_int64, pixel_coords, tile_ids


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
    pid_m, pid_n = tile_ids(M=M, N=C_G, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_c = offs_c < C_G
    if INT64:
        offs_m = offs_m.to(tl.int64)
    img, h, v = pixel_coords(offs_m, H, W)  # input pixels

    # ONE loop over (tap, chunk of the group's output channels) steps, taps outer: Triton
    # pipelines only the innermost loop of a nest (conv.py's main loop says why).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hp0 = h + pad_h
    vq0 = v + pad_w
    STEPS = tl.maximum(tl.cdiv(K_G, BLOCK_K), 1)
    for it in range(0, R * S * STEPS):
        tap = it // STEPS
        ks = (it % STEPS) * BLOCK_K + offs_k
        k_ok = ks < K_G
        hp = hp0 - (tap // S) * dil_h
        vq = vq0 - (tap % S) * dil_w
        p = hp // stride_h
        q = vq // stride_w
        ok = (mask_m & (hp >= 0) & (hp % stride_h == 0) & (p < P)
              & (vq >= 0) & (vq % stride_w == 0) & (q < Q))
        dy_row = ((img * P + p) * Q + q) * K + g * K_G
        w_tap = tap * C_G + offs_c
        a = tl.load(dy_ptr + dy_row[:, None] + ks[None, :],
                    mask=ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + ((g * K_G + ks) * (R * S * C_G))[:, None] + w_tap[None, :],
                    mask=k_ok[:, None] & mask_c[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)

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
        img, p, q = pixel_coords(offs_m, P, Q)
        ih = p * stride_h - pad_h + r * dil_h
        iw = q * stride_w - pad_w + s * dil_w
        pix_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_row = ((img * H + ih) * W + iw) * C + g * C_G
        a = tl.load(x_ptr + x_row[None, :] + offs_c[:, None],
                    mask=mask_c[:, None] & pix_ok[None, :], other=0.0)
        b = tl.load(dy_ptr + offs_m[:, None] * K + (g * K_G + offs_n)[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)

    # dw[k, c, r, s] at k*RSC + tap*C_G + c (OHWI), past the K*RSC values of earlier splits.
    # A scalar tile base: the fully vectorized address made ptxas spill 8 B (C32 x N128, tf32).
    dw_tile = dw_ptr + (split * K + g * K_G) * RSC + tap * C_G
    tl.store(dw_tile + (offs_n * RSC)[None, :] + offs_c[:, None], acc,
             mask=mask_c[:, None] & mask_n[None, :])


@triton.jit
def sum_splits_kernel(part_ptr, out_ptr, SPLIT, NUMEL, BLOCK: tl.constexpr):
    """out[i] = sum_s part[s, i], s in order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


def conv_dgrad(dy, w, x_shape, *, stride, padding, dilation, groups):
    """dx (N, C, H, W) channels_last in dy's dtype. dy: (N, K, P, Q) channels_last-dense;
    w: the forward's weight (K, C/groups, R, S) in the kernels' layout
    (``conv.kernel_weight``), dy's dtype."""
    n, c, h, wd = x_shape
    _, k, p, q = dy.shape
    r, s = w.shape[2:]
    dx = torch.empty((n, c, h, wd), dtype=dy.dtype, device=dy.device,
                     memory_format=torch.channels_last)
    m = n * h * wd
    if m == 0 or c == 0:
        return dx
    c_g, k_g = c // groups, k // groups
    cfg = dgrad_config(m, c_g, k_g, dy.itemsize)
    upcast, precision = dot_flags(dy.dtype)
    grid = (-(-m // cfg.BLOCK_M) * -(-c_g // cfg.BLOCK_N), groups)  # ceiling divisions
    conv_dgrad_kernel[grid](
        dy, w, dx, h, wd, c, p, q, m, k, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=r, S=s, INT64=needs_int64(dx, dy), UPCAST=upcast, PRECISION=precision,
        **cfg.kwargs)
    return dx


def conv_wgrad(x, dy, *, kernel_size, stride, padding, dilation, groups, split=None):
    """dw (K, C/groups, R, S) fp32 in the kernels' layout (channels_last memory). x:
    (N, C, H, W) and dy: (N, K, P, Q), both channels_last-dense and of one dtype. ``split``:
    split-K factor over the output pixels (default: ``wgrad_split``'s on a GPU, else 1)."""
    n, c, h, wd = x.shape
    _, k, p, q = dy.shape
    r, s = kernel_size
    c_g, k_g = c // groups, k // groups
    m = n * p * q
    dw = torch.empty((k, c_g, r, s), dtype=torch.float32, device=x.device,
                     memory_format=torch.channels_last)
    if m == 0:
        return dw.zero_()
    blocks = wgrad_blocks(m, c_g, k_g)
    # ceiling divisions: tiles of one group, chunks of BLOCK_M output pixels
    tiles = r * s * -(-c_g // blocks.BLOCK_C) * -(-k_g // blocks.BLOCK_N)
    chunks = -(-m // blocks.BLOCK_M)
    if split is None:
        sms = gpu_sms(x.device)
        split = 1 if sms is None else wgrad_split(tiles * groups, chunks, sms)
    per_split = -(-chunks // split) * blocks.BLOCK_M
    split = -(-m // per_split)
    part = dw if split == 1 else torch.empty((split, dw.numel()), dtype=torch.float32,
                                             device=x.device)
    upcast, precision = dot_flags(x.dtype)
    conv_wgrad_kernel[(tiles, groups, split)](
        x, dy, part, h, wd, c, p, q, m, k, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        per_split, r * s * c_g,
        S=s, INT64=needs_int64(x, dy), UPCAST=upcast, PRECISION=precision, **blocks.kwargs)
    if split > 1:
        sum_splits_kernel[(-(-dw.numel() // 1024),)](part, dw, split, dw.numel(), BLOCK=1024)
    return dw
