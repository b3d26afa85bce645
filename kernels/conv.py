"""Implicit-GEMM convolution on NHWC activations with a fused epilogue.

For an input x of shape (N, H, W, C) (dense NHWC), weights w of shape (R*S*C_g, K) (row
``(r*S + s)*C_g + c``, column = output channel, K contiguous) and G groups, one launch computes

    y[n, p, q, k] = relu?( sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, g*C_g + c]
                                        * w[(r*S + s)*C_g + c, k]
                          + sum_c x2[n, p*st2, q*st2, c] * w2[c, k]          (projection shortcut)
                          + bias[k]
                          + res[n, p*rstep, q*rstep, k - roff] )             (residual, 0 outside)

with g = k // (K / G), fp32 accumulation and one rounding to y's dtype. As a GEMM:
M = N*P*Q output pixels, N = K/G output channels, reduction over taps then channels (C
innermost, contiguous). BatchNorm is folded into w and bias by the caller; the shortcut's
BatchNorm into w2 and bias, so the shortcut is a second GEMM into the same accumulator and its
output never reaches memory. ``rstep``/``roff`` express the CIFAR option-A shortcut (strided
identity, zero-padded channels) as a load pattern. ``GEMM`` (1x1, stride 1, no padding) is the
plain-GEMM path: x is read as an (M, C) matrix, no per-tap index arithmetic or bounds masks.
``PACK`` (fewer than 16 channels a group) reduces over the (s, c) pairs of each kernel row as
one K axis: the 7x7 stem's K per row is 21 (one 32-wide chunk) instead of 7 chunks of 16.
"""
import functools

import torch
import triton
import triton.language as tl

from .configs import interpreting, pick_config

INT32_SAFE = 2 ** 30  # numel above which offsets (masked lanes included) may pass 2**31
SPLITK_BLOCK_M, SPLITK_BLOCK_N = 64, 64  # splitk_epilogue_kernel's tile


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b. UPCAST: the interpreter's bf16 dot is wrong, so go through fp32 there."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program over an (M, N) output in BLOCK_M x BLOCK_N tiles, in
    groups of GROUP_M tile rows so neighbouring programs share operand tiles in L2."""
    pid = tl.program_id(0)
    pids_per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % pids_per_group) % group_rows, (pid % pids_per_group) // group_rows


@triton.jit(do_not_specialize=["M"])  # M = N*P*Q: a new batch size must not recompile
def conv_fused_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, x2_ptr, w2_ptr, y_ptr, stats_ptr, part_ptr,
    H, W, C, P, Q, M, K, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    RH, RW, RC, res_step, res_off,
    H2, W2, C2, stride2,
    R: tl.constexpr, S: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, HAS_SHORTCUT: tl.constexpr,
    RELU: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WITH_STATS: tl.constexpr, GEMM: tl.constexpr, PACK: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Which tile am I: grouped ordering over (M tiles, N tiles) of one conv group.
    g = tl.program_id(1)
    sk = tl.program_id(2)  # split-K: this program reduces every SPLIT-th chunk from the sk-th
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = tile_ids(M, K_G, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < K_G
    chan = g * K_G + offs_n
    if INT64:
        offs_m = offs_m.to(tl.int64)
    img = offs_m // (P * Q)
    p = (offs_m // Q) % P
    q = offs_m % Q

    # Main conv: taps (r, s), then chunks of the group's input channels; with PACK, rows r,
    # then chunks of the (s, c) pairs of a row (weight rows r*S*C_G + s*C_G + c).
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(R):
        ih = p * stride_h - pad_h + r * dil_h
        if PACK:  # few channels a group: one K axis over (s, c), so MMA lanes are not padding
            row_ok = mask_m & (ih >= 0) & (ih < H)
            x_row = (img * H + ih) * W
            iw0 = q * stride_w - pad_w
            for k0 in range(sk * BLOCK_K, S * C_G, SPLIT * BLOCK_K):
                ks = k0 + offs_k
                k_ok = ks < S * C_G
                iw = iw0[:, None] + (ks // C_G)[None, :] * dil_w
                a = tl.load(x_ptr + (x_row[:, None] + iw) * C + g * C_G + (ks % C_G)[None, :],
                            mask=row_ok[:, None] & k_ok[None, :] & (iw >= 0) & (iw < W),
                            other=0.0)
                b = tl.load(w_ptr + (r * S * C_G + ks)[:, None] * K + chan[None, :],
                            mask=k_ok[:, None] & mask_n[None, :], other=0.0)
                acc = _mma(a, b, acc, UPCAST, PRECISION)
        else:
            for s in range(S):
                iw = q * stride_w - pad_w + s * dil_w
                if GEMM:  # 1x1, stride 1, no padding: output pixel m reads input pixel m
                    pix_ok = mask_m
                    x_row = offs_m * C + g * C_G
                else:
                    pix_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    x_row = ((img * H + ih) * W + iw) * C + g * C_G
                w_row = (r * S + s) * C_G
                for c0 in range(sk * BLOCK_K, C_G, SPLIT * BLOCK_K):
                    cs = c0 + offs_k
                    c_ok = cs < C_G
                    a = tl.load(x_ptr + x_row[:, None] + cs[None, :],
                                mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
                    b = tl.load(w_ptr + (w_row + cs)[:, None] * K + chan[None, :],
                                mask=c_ok[:, None] & mask_n[None, :], other=0.0)
                    acc = _mma(a, b, acc, UPCAST, PRECISION)

    # Projection shortcut: a 1x1 strided conv of the block input into the same accumulator.
    if HAS_SHORTCUT:
        x2_row = ((img * H2 + p * stride2) * W2 + q * stride2) * C2
        for c0 in range(sk * BLOCK_K, C2, SPLIT * BLOCK_K):
            cs = c0 + offs_k
            c_ok = cs < C2
            a = tl.load(x2_ptr + x2_row[:, None] + cs[None, :],
                        mask=mask_m[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w2_ptr + cs[:, None] * K + chan[None, :],
                        mask=c_ok[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, UPCAST, PRECISION)

    if SPLIT > 1:  # fp32 partial sums; splitk_epilogue_kernel adds them up in order
        tl.store(part_ptr + (sk * M + offs_m)[:, None] * K + chan[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])
    else:
        _epilogue(acc, offs_m, chan, mask_m, mask_n, img, p, q, bias_ptr, res_ptr, y_ptr,
                  stats_ptr, K, RH, RW, RC, res_step, res_off, pid_m, num_pid_m,
                  HAS_BIAS, HAS_RES, RELU, WITH_STATS)


@triton.jit(do_not_specialize=["M"])
def splitk_epilogue_kernel(part_ptr, bias_ptr, res_ptr, y_ptr, M, K, P, Q, RH, RW, RC,
                           res_step, res_off,
                           HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
                           INT64: tl.constexpr, SPLIT: tl.constexpr,
                           SPLITK_BLOCK_M: tl.constexpr, SPLITK_BLOCK_N: tl.constexpr):
    """y = epilogue(sum_{s < SPLIT} part[s]): split-K's partial sums, added in a fixed order."""
    offs_m = tl.program_id(0) * SPLITK_BLOCK_M + tl.arange(0, SPLITK_BLOCK_M)
    chan = tl.program_id(1) * SPLITK_BLOCK_N + tl.arange(0, SPLITK_BLOCK_N)
    mask_m = offs_m < M
    mask_n = chan < K
    if INT64:
        offs_m = offs_m.to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((SPLITK_BLOCK_M, SPLITK_BLOCK_N), dtype=tl.float32)
    for sk in range(SPLIT):
        acc += tl.load(part_ptr + (sk * M + offs_m)[:, None] * K + chan[None, :], mask=mask,
                       other=0.0)
    _epilogue(acc, offs_m, chan, mask_m, mask_n, offs_m // (P * Q), (offs_m // Q) % P,
              offs_m % Q, bias_ptr, res_ptr, y_ptr, y_ptr, K, RH, RW, RC, res_step, res_off,
              0, 1, HAS_BIAS, HAS_RES, RELU, False)


@triton.jit
def load_residual(res_ptr, img, p, q, chan, mask_m, mask_n, RH, RW, RC, res_step, res_off):
    """fp32 residual tile for output pixels (img, p, q) and channels chan: the dense NHWC
    residual res[img, p*res_step, q*res_step, chan - res_off], zero outside its RC channels
    (identity: step 1, offset 0; CIFAR option A: step 2, zero-padded channels)."""
    rc = chan - res_off
    ok = mask_m[:, None] & (mask_n & (rc >= 0) & (rc < RC))[None, :]
    row = ((img * RH + p * res_step) * RW + q * res_step) * RC
    return tl.load(res_ptr + row[:, None] + rc[None, :], mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _epilogue(acc, offs_m, chan, mask_m, mask_n, img, p, q, bias_ptr, res_ptr, y_ptr,
              stats_ptr, K, RH, RW, RC, res_step, res_off, pid_m, num_pid_m,
              HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
              WITH_STATS: tl.constexpr):
    """Bias (folded BN shift), residual, ReLU; one rounding on store; BN statistics."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chan, mask=mask_n, other=0.0)[None, :]
    if HAS_RES:
        acc += load_residual(res_ptr, img, p, q, chan, mask_m, mask_n, RH, RW, RC, res_step,
                             res_off)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # NaN stays NaN, as torch.relu
    y_mask = mask_m[:, None] & mask_n[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * K + chan[None, :], y, mask=y_mask)
    if WITH_STATS:  # (count, mean, M2) of this tile's stored outputs, per channel
        y = tl.where(y_mask, y.to(tl.float32), 0.0)
        cnt = tl.sum(mask_m.to(tl.float32), axis=0)
        mean = tl.sum(y, axis=0) / cnt
        m2 = tl.sum(tl.where(y_mask, (y - mean[None, :]) * (y - mean[None, :]), 0.0), axis=0)
        part = stats_ptr + pid_m * K + chan
        tl.store(part, tl.zeros_like(mean) + cnt, mask=mask_n)
        tl.store(part + num_pid_m * K, mean, mask=mask_n)
        tl.store(part + 2 * num_pid_m * K, m2, mask=mask_n)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k(tiles: int, chunks_per_tap: int, taps: int, sms: int) -> int:
    """Split-K factor (a power of two, at most 16): split the reduction while the output
    tiles fill less than half the GPU (layer4 at small batch: 4 tiles on 132 SMs), every
    split keeps at least one channel chunk a tap, and at least 4 chunks in all."""
    split = 1
    while (split * 2 <= min(16, chunks_per_tap) and tiles * split * 2 <= sms
           and taps * chunks_per_tap >= 4 * split * 2):
        split *= 2
    return split


def packs_taps(c_per_group: int, s: int) -> bool:
    """Whether the kernel reduces over (s, c) pairs of a kernel row instead of tap by tap:
    for fewer than 16 channels a group (the 7x7 stem's 3, ResNeXt's 4), where a channel chunk
    of at least 16 (the tensor cores' K) would be mostly padding."""
    return s > 1 and c_per_group < 16


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_fused(x, w, bias, *, kernel_size, stride, padding, dilation, groups, relu,
               residual=None, res_step=1, res_off=0, shortcut=None, shortcut_stride=1,
               shortcut_w=None, allow_tf32=True, with_stats=False, config=None, split=None):
    """Launch ``conv_fused_kernel``. Returns y as an (N, K, P, Q) channels_last tensor; with
    ``with_stats``, (y, partials): partials (3, T, K) fp32 holds each M-tile's per-channel
    (count, mean, M2) of the stored y, for ``kernels.bn.bn_merge`` (T = number of M tiles).

    x: (N, C, H, W) channels_last-dense; w: (R*S*C/groups, K) contiguous; bias: (K,) fp32 or
    None; residual: (N, RC, RH, RW) channels_last-dense or None; shortcut: the block input
    (N, C2, H2, W2) channels_last-dense with shortcut_w (C2, K), or None. The caller validates
    shapes, dtypes and devices (``fastres.ops``). ``config``: a ``ConvConfig`` to use instead
    of ``pick_config``'s (autotune passes its candidates here); ``split``: a split-K factor
    instead of ``split_k``'s (which splits only on a GPU, when the tiles cannot fill it).
    """
    args = dict(locals())
    n, c, h, wd = x.shape
    r, s = kernel_size
    k = w.shape[1]
    p = out_size(h, r, stride[0], padding[0], dilation[0])
    q = out_size(wd, s, stride[1], padding[1], dilation[1])
    y = torch.empty((n, k, p, q), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    m = n * p * q
    if m == 0 or k == 0:
        return (y, y.new_zeros((3, 0, k), dtype=torch.float32)) if with_stats else y
    c_g, k_g = c // groups, k // groups
    pack = packs_taps(c_g, s)
    chunk = max(s * c_g if pack else c_g, shortcut.shape[1] if shortcut is not None else 0)
    cfg = config or pick_config(  # autotune (FASTRES_AUTOTUNE=1) times launch(cfg)
        m, k_g, chunk, x.element_size(), r if pack else r * s,
        launch=lambda cfg: conv_fused(**dict(args, config=cfg)))
    tiles = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(k_g, cfg.BLOCK_N)
    if split is None:
        split = 1 if with_stats or not x.is_cuda else split_k(
            tiles * groups, triton.cdiv(chunk, cfg.BLOCK_K), r if pack else r * s,
            sm_count(x.device))
    res_shape = residual.shape[1:] if residual is not None else (0, 0, 0)
    sc_shape = shortcut.shape[1:] if shortcut is not None else (0, 0, 0)
    big = max(t.numel() for t in (x, y, residual, shortcut) if t is not None) * split
    precision = ("tf32" if allow_tf32 else "ieee") if x.dtype == torch.float32 else None
    stats = part = y
    if with_stats:
        stats = torch.empty((3, triton.cdiv(m, cfg.BLOCK_M), k), dtype=torch.float32,
                            device=x.device)
    if split > 1:
        part = torch.empty((split, m, k), dtype=torch.float32, device=x.device)
    conv_fused_kernel[(tiles, groups, split)](
        x, w, bias if bias is not None else w,
        residual if residual is not None else x,
        shortcut if shortcut is not None else x,
        shortcut_w if shortcut_w is not None else w, y, stats, part,
        h, wd, c, p, q, m, k, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        res_shape[1], res_shape[2], res_shape[0], res_step, res_off,
        sc_shape[1], sc_shape[2], sc_shape[0], shortcut_stride,
        R=r, S=s, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        HAS_SHORTCUT=shortcut is not None, RELU=relu, INT64=big > INT32_SAFE,
        UPCAST=interpreting() and x.dtype == torch.bfloat16, PRECISION=precision,
        WITH_STATS=with_stats,
        GEMM=(r, s) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0),
        PACK=pack, SPLIT=split, **cfg.kwargs(),
    )
    if split > 1:
        splitk_epilogue_kernel[(triton.cdiv(m, SPLITK_BLOCK_M), triton.cdiv(k, SPLITK_BLOCK_N))](
            part, bias if bias is not None else part, residual if residual is not None else y, y,
            m, k, p, q, res_shape[1], res_shape[2], res_shape[0], res_step, res_off,
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, RELU=relu,
            INT64=big > INT32_SAFE, SPLIT=split, SPLITK_BLOCK_M=SPLITK_BLOCK_M,
            SPLITK_BLOCK_N=SPLITK_BLOCK_N)
    return (y, stats) if with_stats else y
