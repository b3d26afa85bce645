"""Convolution backward on NHWC tensors: input gradient (dgrad) and weight gradient (wgrad).

Forward (see ``conv.py``, which also states the weight layout: (K, C_g, R, S) in channels_last
memory): y[n, p, q, k] = sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, g*C_g + c]
* w[k, c, r, s], with g = k // K_g. Given dy (N, P, Q, K):

  dgrad  dx[n, h, v, g*C_g + c] = sum_{r,s,k in group g} dy[n, p, q, k] * w[k, c, r, s]
         over the taps where p = (h + ph - r*dh) / sh and q = (v + pw - s*dw) / sw are integers
         inside the output. Decomposed into stride phases (grid axis 2): the input pixels
         (a + sh*i, b + sw*j) of phase (a, b) receive only the taps with r*dh = a + ph (mod sh)
         and s*dw = b + pw (mod sw), a progression of step sh/gcd(sh, dh) (sw/gcd(sw, dw)),
         and read dy at (i + off_r, j + off_s). Per phase an implicit GEMM: M = N*HV*WV
         pixels, N = C_g, reduction over the phase's landing taps then output channels of the
         group, so a stride-2 dgrad executes no MMA for taps that miss; a phase no tap
         reaches (1x1 stride 2: three of four) stores zeros. ``dgrad_plan`` is the host's view.
  wgrad  dw[k, c, r, s] = sum_{n,p,q} x[n, ih, iw, g*C_g + c] * dy[n, p, q, k], stored in the
         weight layout (OHWI). One tile per (tap, C_g block, K_g block, group, split):
         split-K over M = N*P*Q output pixels into fp32 partials (SPLIT, K, R, S, C_g), then
         summed over splits in a fixed order (no atomics: deterministic).

Both accumulate in fp32; dx is rounded once to x's dtype, dw stays fp32.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .configs import dgrad_config, gpu_sms, wgrad_blocks, wgrad_split
from .conv import _mma, dot_flags, needs_int64, pixel_coords, tile_ids


@triton.jit
def _phase_taps(a, n_in, n_out, pad, dil, stride, T: tl.constexpr):
    """One axis of a stride phase (input rows a + stride*i, i < n_in, of a conv axis with T
    taps and n_out output rows): (first tap, number of taps, output-row offset of the first).
    Tap t lands on row a + stride*i iff a + pad - t*dil = stride*off (output row i + off);
    those taps form a progression of step stride/gcd(stride, dil), trimmed to the ones whose
    offset reaches an output row for some i (``dgrad_axis_taps`` on the host, the same rule)."""
    first = T
    count = 0
    off0 = 0
    for t in tl.static_range(T):
        d = a + pad - t * dil
        off = d // stride  # exact when it lands
        lands = (d % stride == 0) & (off > -n_in) & (off < n_out) & (n_in > 0)
        take = lands & (count == 0)
        first = tl.where(take, t, first)
        off0 = tl.where(take, off, off0)
        count = count + lands.to(tl.int32)
    return first, count, off0


@triton.jit(do_not_specialize=["M"])
def conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    H, W, C, P, Q, M, K, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    TSTEP_H, TSTEP_W, OSTEP_H, OSTEP_W,
    R: tl.constexpr, S: tl.constexpr, MASK: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Stride phase (pa, pb) = program_id(2): input pixels (pa + sh*i, pb + sw*j). Tiles over
    # the phase's own N x HV x WV pixels; the grid covers the largest phase (M pixels, phase
    # 0). The main loop carries its counters (chunk kk, column tap tu, row tap tt, mask bit):
    # no division, and every address is a loop-invariant pointer tensor plus a scalar.
    g = tl.program_id(1)
    phase = tl.program_id(2)
    pa = phase // stride_w
    pb = phase % stride_w
    hp0 = tl.cdiv(H, stride_h)
    wp0 = tl.cdiv(W, stride_w)
    hv = tl.cdiv(H - pa, stride_h)
    wv = tl.cdiv(W - pb, stride_w)
    m_phase = (M // (hp0 * wp0)) * hv * wv
    r0, nr, off_h = _phase_taps(pa, hv, P, pad_h, dil_h, stride_h, R)
    s0, ns, off_w = _phase_taps(pb, wv, Q, pad_w, dil_w, stride_w, S)
    pid_m, pid_n = tile_ids(M=M, N=C_G, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)
    # Taps that land x chunks of the group's output channels; none for a tile past the
    # phase's pixels or a phase no tap reaches (its dx is the zeros acc starts as).
    STEPS = tl.maximum(tl.cdiv(K_G, BLOCK_K), 1)
    iters = tl.where(pid_m * BLOCK_M < m_phase, nr * ns * STEPS, 0)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    img, i, j = pixel_coords(offs_m, tl.maximum(hv, 1), tl.maximum(wv, 1))
    dx_row = ((img * H + pa + stride_h * i) * W + pb + stride_w * j) * C + g * C_G

    # Loads read clamped rows (always in bounds, results never stored), so only taps that
    # miss the output, a K tail and a channel tail need masks. Row bases and the tap mask are
    # computed here once; the loop adds scalar offsets.
    ic = tl.minimum(i, hv - 1)
    jc = tl.minimum(j, wv - 1)
    imgc = tl.minimum(img, M // (hp0 * wp0) - 1)
    c_ok = offs_c < C_G
    a_ptrs = dy_ptr + ((((imgc * P + ic + off_h) * Q + jc + off_w) * K + g * K_G)[:, None]
                       + offs_k[None, :])
    b_ptrs = w_ptr + (((g * K_G + offs_k) * (R * S * C_G))[:, None]
                      + ((r0 * S + s0) * C_G + offs_c)[None, :])
    if MASK >= 32:  # bit t*ns + u: tap (t, u) reaches an output pixel from this row
        hbits = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for t in tl.static_range(R):
            ph = ic + off_h - t * OSTEP_H
            hbits |= ((ph >= 0) & (ph < P) & (t < nr)).to(tl.int32) << t
        wbits = tl.zeros((BLOCK_M,), dtype=tl.int32)
        for u in tl.static_range(S):
            pw = jc + off_w - u * OSTEP_W
            wbits |= ((pw >= 0) & (pw < Q) & (u < ns)).to(tl.int32) << u
        mdt = tl.int32 if MASK == 32 else tl.int64
        taps_ok = tl.zeros((BLOCK_M,), dtype=mdt)
        for t in tl.static_range(R):
            taps_ok |= tl.where(((hbits >> t) & 1) != 0,
                                wbits.to(mdt) << tl.where(t < nr, t * ns, 0).to(mdt), 0)
        bit = tl.full((), 1, mdt)

    a_tap_h = OSTEP_H * Q * K  # dy offset of one row tap step
    a_tap_w = OSTEP_W * K
    b_tap_h = TSTEP_H * S * C_G  # weight offset of one row tap step
    b_tap_w = TSTEP_W * C_G
    b_chunk = BLOCK_K * (R * S * C_G)
    kk = tl.zeros((), dtype=tl.int32)  # chunk, column tap, row tap: loop-carried counters
    tu = tl.zeros((), dtype=tl.int32)
    tt = tl.zeros((), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, iters):
        a_off = kk * BLOCK_K - tt * a_tap_h - tu * a_tap_w
        b_off = kk * b_chunk + tt * b_tap_h + tu * b_tap_w
        if MASK >= 32:
            row_ok = (taps_ok & bit) != 0
        elif MASK == 1:  # more taps than bits: compare
            ph = ic + off_h - tt * OSTEP_H
            pw = jc + off_w - tu * OSTEP_W
            row_ok = (ph >= 0) & (ph < P) & (pw >= 0) & (pw < Q)
        if EVEN_K:
            if MASK == 0:
                a = tl.load(a_ptrs + a_off)
            else:
                a = tl.load(a_ptrs + a_off, mask=row_ok[:, None], other=0.0)
            if EVEN_N:
                b = tl.load(b_ptrs + b_off)
            else:
                b = tl.load(b_ptrs + b_off, mask=c_ok[None, :], other=0.0)
        else:
            k_ok = kk * BLOCK_K + offs_k < K_G
            if MASK == 0:
                a = tl.load(a_ptrs + a_off, mask=k_ok[None, :], other=0.0)
            else:
                a = tl.load(a_ptrs + a_off, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs + b_off, mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)
        kk += 1
        next_tap = kk == STEPS
        kk = tl.where(next_tap, 0, kk)
        tu += next_tap.to(tl.int32)
        next_row = tu == ns
        tu = tl.where(next_row, 0, tu)
        tt += next_row.to(tl.int32)
        if MASK >= 32:
            bit = bit << next_tap.to(mdt)

    tl.store(dx_ptr + dx_row[:, None] + offs_c[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < m_phase)[:, None] & c_ok[None, :])


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


def dgrad_axis_taps(a: int, size: int, out: int, taps: int, stride: int, pad: int,
                    dil: int) -> tuple:
    """One axis of stride phase ``a`` (input rows a + stride*i, i < n): (n, first tap, number
    of taps, output-row offset of the first). The kernel's ``_phase_taps``, on the host."""
    n = max(0, -(-(size - a) // stride))
    landing = [(t, (a + pad - t * dil) // stride) for t in range(taps)
               if (a + pad - t * dil) % stride == 0
               and -n < (a + pad - t * dil) // stride < out]
    if not landing or not n:
        return n, 0, 0, 0
    return n, landing[0][0], len(landing), landing[0][1]


@functools.lru_cache(maxsize=1024)
def dgrad_plan(h: int, w: int, p: int, q: int, r: int, s: int, stride: tuple, padding: tuple,
               dilation: tuple) -> tuple:
    """The stride phases of a dgrad: ((rows, columns, taps) a phase, in phase order (a, b)
    row-major; the MASK constexpr: 0 when every tap of every phase reaches an output pixel
    from every input pixel of the phase, else the width of the per-row tap bitmask (32, 64)
    or 1 (more than 64 taps: compare in the loop))."""
    phases, masked, most = [], False, 0
    axes = []
    for size, out, taps, st, pad, dil in ((h, p, r, stride[0], padding[0], dilation[0]),
                                          (w, q, s, stride[1], padding[1], dilation[1])):
        ostep = dil // math.gcd(st, dil)
        info = []
        for a in range(st):
            n, _, count, off0 = dgrad_axis_taps(a, size, out, taps, st, pad, dil)
            info.append((n, count, count > 0 and not (
                off0 <= out - n and off0 - (count - 1) * ostep >= 0)))
        axes.append(info)
    for n_h, c_h, m_h in axes[0]:
        for n_w, c_w, m_w in axes[1]:
            taps = c_h * c_w
            phases.append((n_h, n_w, taps))
            if n_h and n_w and taps:
                masked = masked or m_h or m_w
                most = max(most, taps)
    mask = 0 if not masked else 32 if most <= 32 else 64 if most <= 64 else 1
    return tuple(phases), mask


def conv_dgrad(dy, w, x_shape, *, stride, padding, dilation, groups):
    """dx (N, C, H, W) channels_last in dy's dtype. dy: (N, K, P, Q) channels_last-dense;
    w: the forward's weight (K, C/groups, R, S) in the kernels' layout
    (``conv.kernel_weight``), dy's dtype. One launch: grid axis 2 over the stride phases."""
    n, c, h, wd = x_shape
    _, k, p, q = dy.shape
    r, s = w.shape[2:]
    dx = torch.empty((n, c, h, wd), dtype=dy.dtype, device=dy.device,
                     memory_format=torch.channels_last)
    if n * h * wd == 0 or c == 0:
        return dx
    sh, sw = stride
    c_g, k_g = c // groups, k // groups
    m = n * -(-h // sh) * -(-wd // sw)  # the largest phase's pixels (phase 0)
    _, mask = dgrad_plan(h, wd, p, q, r, s, tuple(stride), tuple(padding), tuple(dilation))
    cfg = dgrad_config(m, c_g, k_g, dy.itemsize)
    upcast, precision = dot_flags(dy.dtype)
    gh, gw = math.gcd(sh, dilation[0]), math.gcd(sw, dilation[1])
    grid = (-(-m // cfg.BLOCK_M) * -(-c_g // cfg.BLOCK_N), groups, sh * sw)
    conv_dgrad_kernel[grid](
        dy, w, dx, h, wd, c, p, q, m, k, c_g, k_g,
        sh, sw, padding[0], padding[1], dilation[0], dilation[1],
        sh // gh, sw // gw, dilation[0] // gh, dilation[1] // gw,
        R=r, S=s, MASK=mask, EVEN_K=k_g % cfg.BLOCK_K == 0,
        EVEN_N=c_g % cfg.BLOCK_N == 0, INT64=needs_int64(dx, dy, w),
        UPCAST=upcast, PRECISION=precision, **cfg.kwargs)
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
