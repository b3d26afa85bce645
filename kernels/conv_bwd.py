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
from .conv import _mma, dot_flags, needs_int64, packs_taps, pixel_coords, tile_ids


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


@triton.jit
def _wgrad_chunk(acc, x_ptr, dy_ptr, dy_at, dy_tile, x_at, ih, iw, left, offs_i, col, col_w,
                 mask_c, mask_n, H, W,
                 GEMM: tl.constexpr, PACK: tl.constexpr, TAIL: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc[n, c] += sum over the chunk's pixels i of dy[i, n] * x[i, c]: dy rows at
    dy_at + dy_tile, x rows at x_at (+ col), the pixels past ``left`` masked when TAIL."""
    pix_ok = offs_i < left
    if TAIL:
        a = tl.load(dy_ptr + dy_at + dy_tile, mask=mask_n[:, None] & pix_ok[None, :], other=0.0)
    else:
        a = tl.load(dy_ptr + dy_at + dy_tile, mask=mask_n[:, None], other=0.0)
    if GEMM:  # output pixel m reads input pixel m: x rows at x_at + i*C (in col's tile)
        if TAIL:
            b = tl.load(x_ptr + x_at + col, mask=pix_ok[:, None] & mask_c[None, :], other=0.0)
        else:
            b = tl.load(x_ptr + x_at + col, mask=mask_c[None, :], other=0.0)
    else:  # (ih, iw): the input pixel each chunk row reads; unsigned: one compare a bound
        ok = ih.to(tl.uint32, bitcast=True) < H.to(tl.uint32)
        if not PACK:
            ok = ok & (iw.to(tl.uint32, bitcast=True) < W.to(tl.uint32))
        if TAIL:
            ok = ok & pix_ok
        if PACK >= 2:  # a run of the image row from element iw - lead (W: the row's W*C)
            run = tl.multiple_of(x_at - (PACK - 2), 2)
            in_row = tl.multiple_of(iw - (PACK - 2), 2)[:, None] + col[None, :]
            mask = ok[:, None] & (in_row.to(tl.uint32, bitcast=True) < W.to(tl.uint32))
            b = tl.load(x_ptr + run[:, None] + col[None, :], mask=mask, other=0.0)
        else:
            mask = ok[:, None] & mask_c[None, :]
            if PACK:  # column j's input column iw + s*dil_w
                mask = mask & ((iw[:, None] + col_w[None, :]).to(tl.uint32, bitcast=True)
                               < W.to(tl.uint32))
            b = tl.load(x_ptr + x_at[:, None] + col[None, :], mask=mask, other=0.0)
    return _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)


@triton.jit(do_not_specialize=["M"])
def conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    H, W, C, P, Q, M, K, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M_PER_SPLIT, RSC,
    S: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    GEMM: tl.constexpr, PACK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Which tile: (tap, column block, output-channel block) of group g, pixel split `split`.
    # The tile's columns are the tap's C_G input channels, or with PACK the (s, c) pairs of
    # kernel row `tap` (RW = S*C_G, weight offset s*C_G + c within the row). PACK 1 gathers
    # each pair; PACK 2 and 3 (groups 1, dilation 1: a kernel row of a pixel reads one run of
    # S*C input elements) load the run from LEAD = PACK - 2 elements before it, so that every
    # run starts at an even element (the launcher checks the parities) and x arrives in
    # aligned pairs (4-byte copies for 2-byte dtypes): column j reads pair (j - LEAD).
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    LEAD: tl.constexpr = PACK - 2 if PACK >= 2 else 0
    if PACK:
        RW = S * C_G
    else:
        RW = C_G
    CW = RW + LEAD
    num_c = tl.cdiv(CW, BLOCK_C)
    num_n = tl.cdiv(K_G, BLOCK_N)
    tap = pid // (num_c * num_n)
    pid_c = (pid // num_n) % num_c
    pid_n = pid % num_n
    if PACK:
        r = tap
        s = 0
    else:
        r = tap // S
        s = tap % S

    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_M)
    mask_c = offs_c < CW
    mask_n = offs_n < K_G
    col_w = offs_c  # PACK 1: column j = s*C_G + c reads input column iw + s*dil_w
    if PACK >= 2:
        col = offs_c
    elif PACK:
        col_w = (offs_c // C_G) * dil_w
        col = col_w * C + offs_c % C_G + g * C_G
    else:
        col = offs_c + g * C_G
    dy_tile = (offs_i * K)[None, :] + (g * K_G + offs_n)[:, None]  # a chunk's dy, from its row

    # The reduction over output pixels [m_start, m_end) in chunks of BLOCK_M: the full
    # chunks in ONE loop without division or pixel-bound masks (Triton pipelines only the
    # innermost loop: conv.py's main loop says why), then the partial chunk, if any, masked.
    # Each chunk row's input pixel (ih, iw) and its x offset are computed once here and
    # carried, advanced by BLOCK_M pixels a chunk: the advance is reduced modulo Q and P, so
    # a coordinate wraps at most once (the GEMM path, 1x1 stride 1 unpadded, reads x as an
    # (M, C) matrix and needs none of it).
    m_start = split * M_PER_SPLIT
    m_end = min(m_start + M_PER_SPLIT, M)
    m_full = m_start + (m_end - m_start) // BLOCK_M * BLOCK_M
    rows = m_start + offs_i
    if INT64:
        rows = rows.to(tl.int64)
    if GEMM:
        col = (offs_i * C)[:, None] + col[None, :]  # a chunk's x, from its first row
        x_at = 0
        ih = 0
        iw = 0
    else:
        img, p, q = pixel_coords(rows, P, Q)
        ih = p * stride_h + (r * dil_h - pad_h)
        iw = q * stride_w + (s * dil_w - pad_w)
        x_at = (img * H + ih) * W + iw  # in pixels: times C at the load keeps C's alignment
    d_q = BLOCK_M % Q
    d_p = (BLOCK_M // Q) % P
    d_img = BLOCK_M // (P * Q)
    iw_end = (Q - 1) * stride_w + (s * dil_w - pad_w)  # last chunk-row iw of an output row
    ih_end = (P - 1) * stride_h + (r * dil_h - pad_h)
    x_step = (d_img * H + d_p * stride_h) * W + d_q * stride_w  # without wraps
    x_wrap_q = stride_h * W - Q * stride_w  # next output row
    x_wrap_p = (H - P * stride_h) * W  # next image
    row_w = W  # the x bound the chunk checks: its input column, or with a run its element
    if PACK >= 2:
        row_w = W * C
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_start, m_full, BLOCK_M):
        if INT64:
            m0_wide = m0.to(tl.int64)
        else:
            m0_wide = m0
        x_row = m0_wide * C if GEMM else x_at * C
        acc = _wgrad_chunk(acc, x_ptr, dy_ptr, m0_wide * K, dy_tile, x_row, ih,
                           iw * C if PACK >= 2 else iw, BLOCK_M, offs_i, col, col_w, mask_c,
                           mask_n, H, row_w, GEMM=GEMM, PACK=PACK,
                           TAIL=False, UPCAST=UPCAST, PRECISION=PRECISION)
        if not GEMM:  # advance the carried pixels by BLOCK_M
            iw += d_q * stride_w
            wrap_q = iw > iw_end
            iw = tl.where(wrap_q, iw - Q * stride_w, iw)
            ih += tl.where(wrap_q, (d_p + 1) * stride_h, d_p * stride_h)
            wrap_p = ih > ih_end
            ih = tl.where(wrap_p, ih - P * stride_h, ih)
            x_at += x_step + tl.where(wrap_q, x_wrap_q, 0) + tl.where(wrap_p, x_wrap_p, 0)
    if m_full < m_end:  # the partial last chunk
        m_wide = m_full
        if INT64:
            m_wide = m_wide.to(tl.int64)
        x_row = m_wide * C if GEMM else x_at * C
        acc = _wgrad_chunk(acc, x_ptr, dy_ptr, m_wide * K, dy_tile, x_row, ih,
                           iw * C if PACK >= 2 else iw, m_end - m_full, offs_i, col, col_w,
                           mask_c, mask_n, H, row_w,
                           GEMM=GEMM, PACK=PACK, TAIL=True, UPCAST=UPCAST,
                           PRECISION=PRECISION)

    # dw[k, c, r, s] at k*RSC + tap*RW + column - LEAD (OHWI), past the K*RSC values of
    # earlier splits. A scalar tile base: the fully vectorized address made ptxas spill 8 B.
    dw_tile = dw_ptr + (split * K + g * K_G) * RSC + tap * RW - LEAD
    tl.store(dw_tile + (offs_n * RSC)[:, None] + offs_c[None, :], acc,
             mask=mask_n[:, None] & (mask_c & (offs_c >= LEAD))[None, :])


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


def wgrad_runs(c: int, width: int, stride_w: int, dilation_w: int, groups: int) -> bool:
    """Whether packed wgrad reads each pixel's kernel row as one run of x in aligned pairs
    (``conv_wgrad_kernel``'s PACK 2/3): groups 1 and dilation 1 (the run is contiguous), and
    every run starts at an element of one parity (even image rows, W*C, and column steps,
    stride*C)."""
    return groups == 1 and dilation_w == 1 and width * c % 2 == 0 and stride_w * c % 2 == 0


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
    pack = int(packs_taps(c_g, s))
    if pack and wgrad_runs(c, wd, stride[1], dilation[1], groups):
        pack = 2 + padding[1] * c % 2  # lead-in of one element when a run starts odd
    cols = s * c_g + max(pack - 2, 0) if pack else c_g  # a tile's columns a tap (pack: a row)
    blocks = wgrad_blocks(m, cols, k_g, x.itemsize)
    # ceiling divisions: tiles of one group, chunks of BLOCK_M output pixels
    tiles = (r if pack else r * s) * -(-cols // blocks.BLOCK_C) * -(-k_g // blocks.BLOCK_N)
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
        S=s, INT64=needs_int64(x, dy), UPCAST=upcast, PRECISION=precision,
        GEMM=r == s == 1 and stride[0] == stride[1] == 1 and padding[0] == padding[1] == 0,
        PACK=pack, **blocks.kwargs)
    if split > 1:
        sum_splits_kernel[(-(-dw.numel() // 1024),)](part, dw, split, dw.numel(), BLOCK=1024)
    return dw
