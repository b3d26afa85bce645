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
         weight layout (OHWI). One dw^T tile (K_g block x C_g block: the output channels in
         the wgmma's M) per (tap, blocks, group, split), reduced over the N*P*Q output pixels
         in chunks of BLOCK_M: a 1x1 stride-1 conv's chunks are runs of pixels (a GEMM), any
         other's boxes of images x rows x columns (``configs.wgrad_box``) whose pixels sit at
         loop-invariant offsets from the box corner, so the main loop has no division and
         only the taps' bounds masks when the boxes and tiles fit the conv. Few channels a
         group (the stem's 3) reduce over a kernel row's (s, c) pairs; with groups 1 and
         dilation 1 each pixel's row is one run of x, padded to 4 channels and read in
         16-byte pieces (``wgrad_run``). Split-K over the chunks into fp32 partials
         (SPLIT, K, R, S, C_g), then summed over splits in a fixed order (no atomics:
         deterministic). The stem-like case (``wgrad_takes_rows``) takes
         ``conv_wgrad_rows_kernel`` instead: x padded once in space and channels, one
         program all R kernel rows (R accumulators), so a chunk's dy tile is loaded once
         for R dots and no tap needs a bounds mask.

Both accumulate in fp32; dx is rounded once to x's dtype, dw stays fp32.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from .configs import (dgrad_config, gpu_sms, wgrad_blocks, wgrad_box, wgrad_rows_blocks,
                      wgrad_split)
from .conv import (_mma, dot_flags, needs_int64, next_step, packs_taps, pad_input,
                   pixel_coords, tile_ids)


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
        kk, tu, tt, next_tap = next_step(kk, tu, tt, STEPS, ns)
        if MASK >= 32:
            bit = bit << next_tap.to(mdt)

    tl.store(dx_ptr + dx_row[:, None] + offs_c[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=(offs_m < m_phase)[:, None] & c_ok[None, :])


@triton.jit
def _u32(v):
    return v.to(tl.uint32, bitcast=True)


@triton.jit
def _wgrad_chunk(acc, x_ptr, dy_ptr, dy_at, dy_tile, dy_ok, x_at, x_tile, x_ok,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc[n, c] += sum over the chunk's pixels i of dy[i, n] * x[i, c]: dy at dy_at + dy_tile
    ([n, i]), x at x_at + x_tile ([i, c]), zero where the masks are off."""
    if dy_ok is None:  # (EXACT)
        a = tl.load(dy_ptr + dy_at + dy_tile)
    else:
        a = tl.load(dy_ptr + dy_at + dy_tile, mask=dy_ok, other=0.0)
    if x_ok is None:
        b = tl.load(x_ptr + x_at + x_tile)
    else:
        b = tl.load(x_ptr + x_at + x_tile, mask=x_ok, other=0.0)
    return _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)


@triton.jit(do_not_specialize=["M", "CHUNKS", "CHUNKS_PER_SPLIT", "BOX_P", "BOX_Q"])
def conv_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr,
    H, W, C, P, Q, M, K, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    CHUNKS, CHUNKS_PER_SPLIT, BOX_P, BOX_Q, RSC,
    S: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    GEMM: tl.constexpr, PACK: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Which tile: (tap, column block, output-channel block) of group g, pixel split `split`.
    # The tile's columns are the tap's C_G input channels, or with PACK the (s, c) pairs of
    # kernel row `tap` (RW = S*C_G, weight offset s*C_G + c within the row). PACK 1 gathers
    # each pair. PACK >= 2 (groups 1, dilation 1: a pixel's kernel row is one run of S*C
    # elements of x, whose C channels may include zero padding past the C_G real ones):
    # column j is element j - LEAD of the run, LEAD chosen so that every run starts at a
    # multiple of PACK elements (the launcher checks the strides), and x arrives in aligned
    # groups of PACK elements (16 bytes for the stem with x padded to 4 channels).
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    LEAD = 0
    if PACK >= 2:
        LEAD = (PACK - pad_w * C % PACK) % PACK
        CW = S * C + LEAD
        RW = S * C_G
    elif PACK:
        CW = S * C_G
        RW = CW
    else:
        CW = C_G
        RW = CW
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
    ih_off = r * dil_h - pad_h
    iw_off = s * dil_w - pad_w

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

    # The reduction over output pixels, CHUNKS chunks of BLOCK_M, this split's
    # [t_start, t_end) in ONE loop (Triton pipelines only the innermost loop: conv.py's main
    # loop says why), with no division in it: each chunk's pixels sit at loop-invariant
    # offsets (x_tile, dy_tile) from a scalar base.
    t_start = split * CHUNKS_PER_SPLIT
    t_end = min(t_start + CHUNKS_PER_SPLIT, CHUNKS)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    if GEMM:
        # 1x1, stride 1, unpadded: x and dy are (M, C) and (M, K) matrices, chunk t the
        # pixels [t*BLOCK_M, +BLOCK_M). Full chunks unmasked, then the partial last one.
        dy_tile = (offs_i * K)[None, :] + (g * K_G + offs_n)[:, None]
        x_tile = (offs_i * C)[:, None] + col[None, :]
        t_full = min(t_end, M // BLOCK_M)
        dy_ok = None
        x_ok = None
        if not EXACT:
            dy_ok = mask_n[:, None]
            x_ok = mask_c[None, :]
        for t in range(t_start, t_full):
            m0 = t * BLOCK_M
            if INT64:
                m0 = m0.to(tl.int64)
            acc = _wgrad_chunk(acc, x_ptr, dy_ptr, m0 * K, dy_tile, dy_ok, m0 * C, x_tile, x_ok,
                               UPCAST=UPCAST, PRECISION=PRECISION)
        if t_full < t_end:
            m0 = t_full * BLOCK_M
            if INT64:
                m0 = m0.to(tl.int64)
            acc = _wgrad_chunk(acc, x_ptr, dy_ptr, m0 * K, dy_tile,
                               mask_n[:, None] & (offs_i < M - m0)[None, :], m0 * C, x_tile,
                               (offs_i < M - m0)[:, None] & mask_c[None, :], UPCAST=UPCAST,
                               PRECISION=PRECISION)
    else:
        # Chunk t is a box of BOX_I images x BOX_P output rows x BOX_Q output columns (the
        # launcher's ``wgrad_box``: a power of two each, product BLOCK_M), boxes ordered
        # column-fastest; chunk row i sits at (di, dp, dq) in its box. The box corner
        # (i0, p0, q0) is carried; masks compare the invariant (di, dp, dq) with scalars.
        BOX_I = BLOCK_M // (BOX_P * BOX_Q)
        N = M // (P * Q)
        di = offs_i // (BOX_P * BOX_Q)
        dp = (offs_i // BOX_Q) % BOX_P
        dq = offs_i % BOX_Q
        if INT64:
            di = di.to(tl.int64)
        dy_tile = (((di * P + dp) * Q + dq) * K)[None, :] + (g * K_G + offs_n)[:, None]
        x_pix = (di * H + dp * stride_h) * W + dq * stride_w  # from the box's first pixel
        # the output rows (columns) whose input row (column) is inside x: [p_lo, p_hi)
        p_lo = tl.maximum((stride_h - 1 - ih_off) // stride_h, 0)
        p_hi = tl.minimum((H - ih_off + stride_h - 1) // stride_h, P)
        q_lo = tl.maximum((stride_w - 1 - iw_off) // stride_w, 0)
        q_hi = tl.minimum((W - iw_off + stride_w - 1) // stride_w, Q)
        if PACK:  # the column bound is the run's (PACK >= 2) or each pair's (PACK 1)
            q_lo = 0
            q_hi = Q
        if PACK >= 2:
            x_tile = tl.multiple_of(x_pix * C, PACK)[:, None] + col[None, :]
            run_at = tl.multiple_of((dq * stride_w) * C, PACK)[:, None] + col[None, :]
        else:
            x_tile = (x_pix * C)[:, None] + col[None, :]
            run_at = (dq * stride_w)[:, None] + col_w[None, :]
        box_blocks_q = tl.cdiv(Q, BOX_Q)
        box_blocks_p = tl.cdiv(P, BOX_P)
        q0 = t_start % box_blocks_q * BOX_Q
        p0 = t_start // box_blocks_q % box_blocks_p * BOX_P
        i0 = t_start // (box_blocks_q * box_blocks_p) * BOX_I
        for t in range(t_start, t_end):
            # masks: the tap's rows and columns inside x (unsigned: one compare a range),
            # and unless the boxes tile the pixels EXACTly, the pixels past them
            x_ok = _u32(dp + (p0 - p_lo)) < _u32(p_hi - p_lo)
            if not (PACK and EXACT):  # (PACK: the range is [0, Q))
                x_ok = x_ok & (_u32(dq + (q0 - q_lo)) < _u32(q_hi - q_lo))
            if EXACT:  # (and the tile's rows and columns are all in the conv)
                dy_ok = None
            else:
                img_ok = di < N - i0
                x_ok = x_ok & img_ok
                dy_ok = mask_n[:, None] & (img_ok & (dp < P - p0) & (dq < Q - q0))[None, :]
            if INT64:
                i0_wide = i0.to(tl.int64)
            else:
                i0_wide = i0
            ih0 = p0 * stride_h + ih_off
            iw0 = q0 * stride_w + iw_off
            x_at = (((i0_wide * H + ih0) * W + iw0) * C)
            if PACK >= 2:  # the run starts LEAD elements early; its elements stay in the row
                x_at = tl.multiple_of(x_at - LEAD, PACK)
                row_at = tl.multiple_of(iw0 * C - LEAD, PACK)
                x_ok = x_ok[:, None] & (_u32(run_at + row_at) < _u32(W * C))
            elif PACK:  # each pair's input column in the row
                x_ok = x_ok[:, None] & mask_c[None, :] & (_u32(run_at + iw0) < _u32(W))
            elif EXACT:
                x_ok = x_ok[:, None]
            else:
                x_ok = x_ok[:, None] & mask_c[None, :]
            acc = _wgrad_chunk(acc, x_ptr, dy_ptr, ((i0_wide * P + p0) * Q + q0) * K, dy_tile,
                               dy_ok, x_at, x_tile, x_ok, UPCAST=UPCAST, PRECISION=PRECISION)
            q0 += BOX_Q  # the next box: column-fastest
            wrap_q = q0 >= Q
            q0 = tl.where(wrap_q, 0, q0)
            p0 += tl.where(wrap_q, BOX_P, 0)
            wrap_p = p0 >= P
            p0 = tl.where(wrap_p, 0, p0)
            i0 += tl.where(wrap_p, BOX_I, 0)

    # dw[k, c, r, s] at k*RSC + tap*RW + column (OHWI), past the K*RSC values of earlier
    # splits. A scalar tile base: the fully vectorized address made ptxas spill 8 B.
    dw_tile = dw_ptr + (split * K + g * K_G) * RSC + tap * RW
    out_c = offs_c
    if PACK >= 2:  # run element e = s*C + c, a weight if c < C_G
        e = tl.maximum(offs_c - LEAD, 0)
        out_c = e // C * C_G + e % C
        mask_c = mask_c & (offs_c >= LEAD) & (e % C < C_G)
    tl.store(dw_tile + (offs_n * RSC)[:, None] + out_c[None, :], acc,
             mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _wgrad_row(acc, x_at, row_step, a, col_ok, ROW: tl.constexpr, R: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Kernel row ROW (if the conv has it): acc += a @ (the x run tile of the row, at x_at
    ([i, j] pointers) + ROW * row_step)."""
    if ROW < R:
        if col_ok is None:
            b = tl.load(x_at + ROW * row_step)
        else:
            b = tl.load(x_at + ROW * row_step, mask=col_ok, other=0.0)
        acc = _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)
    return acc


@triton.jit
def _wgrad_row_store(dw_ptr, acc, dw_n, n_ok, offs_c, C_G, ROW: tl.constexpr,
                     R: tl.constexpr, S: tl.constexpr, CP: tl.constexpr):
    """dw[k, c, ROW, s] = acc[k, s*CP + c] for the real channels c < C_G and taps s < S (if
    the conv has kernel row ROW)."""
    if ROW < R:
        s = offs_c // CP
        c = offs_c % CP
        tl.store(dw_ptr + dw_n[:, None] + ((ROW * S + s) * C_G + c)[None, :], acc,
                 mask=n_ok[:, None] & ((c < C_G) & (s < S))[None, :])


@triton.jit(do_not_specialize=["M", "CHUNKS", "CHUNKS_PER_SPLIT"])
def conv_wgrad_rows_kernel(
    x_ptr, dy_ptr, dw_ptr,
    HP, WP, P, Q, M, K, C_G, stride_h, stride_w, CHUNKS, CHUNKS_PER_SPLIT,
    R: tl.constexpr, S: tl.constexpr, CP: tl.constexpr, EVEN_M: tl.constexpr,
    EVEN_N: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # wgrad of a conv with few channels (the stem), all R kernel rows in one program:
    # x_ptr is x padded in space and to CP channels (HP x WP pixels of CP), so every tap is
    # in bounds. One program per (BLOCK_N output channels, pixel split); per chunk of BLOCK_M
    # flat output pixels the dy tile is loaded once and feeds R dots, one a kernel row r:
    # acc_r[k, j] += sum_i dy[i, k] * xpad[n_i, p_i*sh + r, q_i*sw, j] with column
    # j = s*CP + c a run of S*CP contiguous elements (the rest of BLOCK_C masked off).
    # R <= 8 accumulators as separate variables (a loop cannot carry a list); a row past R
    # leaves its accumulator unchanged (``_wgrad_row``'s constexpr test), so it is dead code.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_i = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C)
    n_ok = offs_n < K
    dy_tile = (offs_i * K)[None, :] + offs_n[:, None]  # dy^T: [k, i]
    col_ok = None
    if S * CP < BLOCK_C:
        col_ok = (offs_c < S * CP)[None, :]
    dy_ok = None
    if not EVEN_N:
        dy_ok = n_ok[:, None]
    row_step = WP * CP  # one kernel row down in xpad
    acc0 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc4 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc5 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc6 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc7 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    t_start = split * CHUNKS_PER_SPLIT
    t_end = min(t_start + CHUNKS_PER_SPLIT, CHUNKS)
    for t in range(t_start, t_end):
        m0 = t * BLOCK_M
        if INT64:
            m0 = m0.to(tl.int64)
        pix = m0 + offs_i
        if EVEN_M:
            a_ok = dy_ok
        else:  # the last chunk's pixels past M: dy masked, x read at the last pixel
            if dy_ok is None:
                a_ok = (pix < M)[None, :]
            else:
                a_ok = dy_ok & (pix < M)[None, :]
            pix = tl.minimum(pix, M - 1)
        if a_ok is None:
            a = tl.load(dy_ptr + m0 * K + dy_tile)
        else:
            a = tl.load(dy_ptr + m0 * K + dy_tile, mask=a_ok, other=0.0)
        img = pix // (P * Q)
        rem = pix - img * (P * Q)
        p = rem // Q
        q = rem - p * Q
        run = tl.multiple_of(((img * HP + p * stride_h) * WP + q * stride_w) * CP, CP)
        x_at = x_ptr + run[:, None] + offs_c[None, :]
        acc0 = _wgrad_row(acc0, x_at, row_step, a, col_ok, 0, R, UPCAST, PRECISION)
        acc1 = _wgrad_row(acc1, x_at, row_step, a, col_ok, 1, R, UPCAST, PRECISION)
        acc2 = _wgrad_row(acc2, x_at, row_step, a, col_ok, 2, R, UPCAST, PRECISION)
        acc3 = _wgrad_row(acc3, x_at, row_step, a, col_ok, 3, R, UPCAST, PRECISION)
        acc4 = _wgrad_row(acc4, x_at, row_step, a, col_ok, 4, R, UPCAST, PRECISION)
        acc5 = _wgrad_row(acc5, x_at, row_step, a, col_ok, 5, R, UPCAST, PRECISION)
        acc6 = _wgrad_row(acc6, x_at, row_step, a, col_ok, 6, R, UPCAST, PRECISION)
        acc7 = _wgrad_row(acc7, x_at, row_step, a, col_ok, 7, R, UPCAST, PRECISION)

    # dw (OHWI) of this split: element [k, c, r, s] at (split*K + k)*R*S*C_G + (r*S + s)*C_G + c
    dw_n = (split * K + offs_n) * (R * S * C_G)
    _wgrad_row_store(dw_ptr, acc0, dw_n, n_ok, offs_c, C_G, 0, R, S, CP)
    _wgrad_row_store(dw_ptr, acc1, dw_n, n_ok, offs_c, C_G, 1, R, S, CP)
    _wgrad_row_store(dw_ptr, acc2, dw_n, n_ok, offs_c, C_G, 2, R, S, CP)
    _wgrad_row_store(dw_ptr, acc3, dw_n, n_ok, offs_c, C_G, 3, R, S, CP)
    _wgrad_row_store(dw_ptr, acc4, dw_n, n_ok, offs_c, C_G, 4, R, S, CP)
    _wgrad_row_store(dw_ptr, acc5, dw_n, n_ok, offs_c, C_G, 5, R, S, CP)
    _wgrad_row_store(dw_ptr, acc6, dw_n, n_ok, offs_c, C_G, 6, R, S, CP)
    _wgrad_row_store(dw_ptr, acc7, dw_n, n_ok, offs_c, C_G, 7, R, S, CP)


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


def wgrad_run(c: int, width: int, stride_w: int, dilation_w: int, groups: int,
              elem_bytes: int) -> tuple:
    """(channels, alignment) for packed wgrad reading each pixel's kernel row as one run of x
    (``conv_wgrad_kernel``'s PACK >= 2), or (c, 1) when it cannot: groups 1 and dilation 1
    (the run is contiguous); x padded to a power of two of channels; every run then starts
    at a multiple of the alignment (at most 16 bytes) that divides the image row (W*C) and
    the column step (stride*C) in elements."""
    if groups != 1 or dilation_w != 1:
        return c, 1
    cp = 1 << (c - 1).bit_length()
    step = math.gcd(width * cp, stride_w * cp, 16 // elem_bytes)
    return cp, step & -step  # its largest power-of-two divisor


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
    if pack and wgrad_takes_rows(c, r, s, dilation, groups, x.dtype):
        return _wgrad_rows(x, dy, dw, r, s, stride, padding, split)
    xc = c  # x's channels as the kernel reads them
    if pack:
        cp, align = wgrad_run(c, wd, stride[1], dilation[1], groups, x.itemsize)
        if align >= 2:  # read runs: pad x's channels with zeros to cp (the stem: 3 -> 4)
            pack, xc = align, cp
            if cp != c:  # one pass, a Triton launch (the report sees its traffic)
                x = pad_input(x, cp, (0, 0))
    # a tile's columns a tap (pack: a row; a run: its padded elements and the lead-in)
    cols = (s * xc + -padding[1] * xc % pack if pack >= 2 else s * c_g) if pack else c_g
    blocks = wgrad_blocks(m, cols, k_g, x.itemsize)
    gemm = r == s == 1 and stride[0] == stride[1] == 1 and padding[0] == padding[1] == 0
    # ceiling divisions: tiles of one group; chunks of BLOCK_M output pixels (boxes of
    # images x rows x columns unless the conv is a plain GEMM)
    tiles = (r if pack else r * s) * -(-cols // blocks.BLOCK_C) * -(-k_g // blocks.BLOCK_N)
    box_i, box_p, box_q = (blocks.BLOCK_M, 1, 1) if gemm else wgrad_box(n, p, q, blocks.BLOCK_M)
    chunks = -(-n // box_i) * -(-p // box_p) * -(-q // box_q) if not gemm else \
        -(-m // blocks.BLOCK_M)
    # EXACT: the boxes tile the pixels and the tiles the channels (no masks but the taps')
    exact = (gemm or n % box_i == p % box_p == q % box_q == 0) and \
        k_g % blocks.BLOCK_N == 0 and (pack or c_g % blocks.BLOCK_C == 0)
    if split is None:
        sms = gpu_sms(x.device)
        split = 1 if sms is None else wgrad_split(tiles * groups, chunks, sms)
    per_split = -(-chunks // split)
    split = -(-chunks // per_split)
    part = dw if split == 1 else torch.empty((split, dw.numel()), dtype=torch.float32,
                                             device=x.device)
    upcast, precision = dot_flags(x.dtype)
    conv_wgrad_kernel[(tiles, groups, split)](
        x, dy, part, h, wd, xc, p, q, m, k, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        chunks, per_split, box_p, box_q, r * s * c_g,
        S=s, INT64=needs_int64(x, dy), UPCAST=upcast, PRECISION=precision, GEMM=gemm,
        PACK=pack, EXACT=exact, **blocks.kwargs)
    if split > 1:
        sum_splits_kernel[(-(-dw.numel() // 1024),)](part, dw, split, dw.numel(), BLOCK=1024)
    return dw


def wgrad_takes_rows(c: int, r: int, s: int, dilation, groups: int, dtype) -> bool:
    """Whether ``conv_wgrad`` takes ``conv_wgrad_rows_kernel`` (the stem-like case): a packed
    conv (few channels, S > 1) of groups 1 and dilation 1, at most 8 kernel rows, a kernel
    row's (s, c) pairs over x padded to a multiple of 4 channels at most 32, a 2-byte or
    fp32 dtype."""
    cp = -(-c // 4) * 4
    return (groups == 1 and tuple(dilation) == (1, 1) and packs_taps(c, s) and r <= 8
            and s * cp <= 32
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def _wgrad_rows(x, dy, dw, r, s, stride, padding, split):
    """``conv_wgrad`` by ``conv_wgrad_rows_kernel``: x padded once (space and channels), then
    each program reduces all R kernel rows of its output channels over its pixel split."""
    n, c, _, _ = x.shape
    _, k, p, q = dy.shape
    cp = -(-c // 4) * 4
    if cp != c or any(padding):  # one pass, a Triton launch (the report sees its traffic)
        x = pad_input(x, cp, padding)
    hp, wp = x.shape[2:]
    m = n * p * q
    blocks = wgrad_rows_blocks(m, s * cp, k, r, x.itemsize)
    tiles = -(-k // blocks.BLOCK_N)
    chunks = -(-m // blocks.BLOCK_M)
    if split is None:
        sms = gpu_sms(x.device)
        split = 1 if sms is None else wgrad_split(tiles, chunks, sms)
    per_split = -(-chunks // split)
    split = -(-chunks // per_split)
    part = dw if split == 1 else torch.empty((split, dw.numel()), dtype=torch.float32,
                                             device=x.device)
    upcast, precision = dot_flags(x.dtype)
    conv_wgrad_rows_kernel[(tiles, split)](
        x, dy, part, hp, wp, p, q, m, k, c, stride[0], stride[1], chunks, per_split,
        R=r, S=s, CP=cp, EVEN_M=m % blocks.BLOCK_M == 0, EVEN_N=k % blocks.BLOCK_N == 0,
        INT64=needs_int64(x, dy), UPCAST=upcast, PRECISION=precision, **blocks.kwargs)
    if split > 1:
        sum_splits_kernel[(-(-dw.numel() // 1024),)](part, dw, split, dw.numel(), BLOCK=1024)
    return dw
