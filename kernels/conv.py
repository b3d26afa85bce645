"""Implicit-GEMM convolution on NHWC activations with a fused epilogue.

Weight layout (the one place it is stated): a conv weight is the module's own (K, C_g, R, S)
tensor in channels_last memory, i.e. OHWI-dense: element [k, c, r, s] lives at
``k*R*S*C_g + (r*S + s)*C_g + c``. ``kernel_weight`` gives that layout (a no-op for a
channels_last weight); the forward, dgrad and wgrad kernels all use it (wgrad writes dw in it).

For an input x of shape (N, H, W, C) (dense NHWC), a weight w as above and G groups
(C_g = C / G input and K_g = K / G output channels a group, g = k // K_g), one launch computes

    acc[n, p, q, k]  = sum_{r,s,c} x[n, p*sh - ph + r*dh, q*sw - pw + s*dw, g*C_g + c]
                                   * w[k, c, r, s]                                (fp32)
    acc2[n, p, q, k] = sum_c x2[n, p*st2, q*st2, c] * w2[k, c, 0, 0]    (projection shortcut)
    y[n, p, q, k] = relu?( acc * scale[k] + shift[k]
                           + acc2 * scale2[k] + shift2[k]                 (projection shortcut)
                           + res[n, p*rstep, q*rstep, k - roff] )         (residual, 0 outside)

with, per output channel in fp32, from the live BatchNorm state ``BNParams(gamma, beta, mean,
var, eps)`` and the conv's own bias b:

    scale = (gamma or 1) / sqrt(var + eps),   shift = (beta or 0) + ((b or 0) - mean) * scale

(without BN: scale = 1, shift = b or 0; the shortcut's BN likewise, without a conv bias), and
one rounding to y's dtype. Nothing is folded into the weights: the shortcut has its own fp32
accumulator because its scale differs from the main conv's, so it never reaches memory and
the result is exact. As a GEMM: M = N*P*Q output pixels, N = K_g output channels, reduction
over taps then channels (C innermost, contiguous). ``rstep``/``roff`` express the CIFAR
option-A shortcut (strided identity, zero-padded channels) as a load pattern. ``GEMM`` (1x1,
stride 1, no padding) is the plain-GEMM path: x is read as an (M, C) matrix, no per-tap index
arithmetic or bounds masks. ``PACK`` (fewer than 16 channels a group; its value is the
channels a group) reduces over the (s, c) pairs of each kernel row as one K axis: the 7x7
stem's K per row is 28 (one 32-wide chunk) instead of 7 chunks of 16. The stem's input is
padded by ``pad_input`` (one pass) to 4 channels and in space, so a kernel row's pairs are 28
contiguous elements of one input row (``ROW``: 8-byte async copies) and no tap needs a bounds
check (``PAD0``, which every conv without padding gets: each tap of an output pixel lies in
the input). ``EVEN_K``/``EVEN_N``: the channel chunks and output-channel tiles are whole, so
the main loop's loads carry no channel masks. ``JOINT`` (``joint_shortcut``): the
projection shortcut of a 1x1 main conv (the Bottleneck's conv3) is reduced in the main
loop, chunk for chunk (main chunks of BLOCK_K, the shortcut's of BLOCK_K2, as many of each),
two dots a step into the two accumulators: one pipeline; otherwise it is a second loop.

Shared with the backward and BatchNorm kernels: ``tile_ids`` (program -> output tile),
``pixel_coords`` (flat pixel index -> image, row, column), ``_mma`` with its host-side flags
``dot_flags`` (the one place the dot's precision is chosen) and ``needs_int64`` (the one place
the int64-indexing decision is made).
"""
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import configs
from .bn_rows import PARTIAL_COUNT, PARTIAL_M2, PARTIAL_MEAN
from .configs import gpu_sms, pick_config, split_k

INT32_SAFE = 2 ** 30  # numel above which offsets (masked lanes included) may pass 2**31
SPLITK_BLOCK_M, SPLITK_BLOCK_N = 64, 64  # splitk_epilogue_kernel's tile


class BNParams(NamedTuple):
    """A BatchNorm's live inference state as the conv epilogue reads it: weight (gamma) and
    bias (beta) of shape (K,), both None for ``affine=False``; running mean and var (K,); eps.
    Any float dtype (fp32, or the activations' when the whole model was cast): the epilogue
    computes in fp32."""
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    mean: torch.Tensor
    var: torch.Tensor
    eps: float


def kernel_weight(w: torch.Tensor) -> torch.Tensor:
    """A conv weight (K, C_g, R, S) in the kernels' layout (module docstring): channels_last
    memory, OHWI-dense. No copy when it already is."""
    return w.contiguous(memory_format=torch.channels_last)


def needs_int64(*tensors) -> bool:
    """Whether a kernel indexing these tensors (None: absent) needs int64 offsets: any of them
    holds more than INT32_SAFE elements."""
    for t in tensors:
        if t is not None and t.numel() > INT32_SAFE:
            return True
    return False


def dot_flags(dtype: torch.dtype) -> tuple:
    """(UPCAST, PRECISION) of ``_mma`` for operands of ``dtype``: fp32 takes tf32 when
    ``torch.backends.cudnn.allow_tf32`` (as PyTorch's own convs do), else ieee; bf16 goes
    through fp32 only under the interpreter, whose bf16 dot is wrong."""
    if dtype is torch.float32:
        return False, "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return configs.INTERPRET and dtype is torch.bfloat16, None


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b. UPCAST: the interpreter's bf16 dot is wrong, so go through fp32 there."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def next_step(chunk, col, row, STEPS, COLS):
    """The (chunk, tap column, tap row) after this step of a flat (tap, chunk) reduction,
    chunks innermost, carried from step to step instead of divided out of the step number;
    and whether this step ended a tap."""
    chunk += 1
    tap_done = chunk == STEPS
    chunk = tl.where(tap_done, 0, chunk)
    col += tap_done.to(tl.int32)
    row_done = col == COLS
    col = tl.where(row_done, 0, col)
    row += row_done.to(tl.int32)
    return chunk, col, row, tap_done


@triton.jit
def pixel_coords(offs, P, Q):
    """(image, row, column) of flat pixel indices offs = (image * P + row) * Q + column over
    images of P x Q pixels (NHWC order)."""
    return offs // (P * Q), (offs // Q) % P, offs % Q


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
    # Main conv: input, weight, output; its epilogue: conv bias, BatchNorm state
    x_ptr, w_ptr, y_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
    # Projection shortcut: input, weight, BatchNorm state
    x2_ptr, w2_ptr, gamma2_ptr, beta2_ptr, mean2_ptr, var2_ptr, eps2,
    # Residual; outputs besides y: BN statistics partials, split-K partial sums
    res_ptr, stats_ptr, part_ptr,
    # Dimensions
    H, W, C, P, Q, M, K, C_G, K_G,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    RH, RW, RC, res_step, res_off,
    H2, W2, C2, stride2,
    # Meta-parameters
    R: tl.constexpr, S: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, BN_AFFINE: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr, SC_AFFINE: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    WITH_STATS: tl.constexpr, GEMM: tl.constexpr, PACK: tl.constexpr, ROW: tl.constexpr,
    SPLIT: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PAD0: tl.constexpr,
    JOINT: tl.constexpr, BLOCK_K2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Which tile am I: grouped ordering over (M tiles, N tiles) of one conv group.
    g = tl.program_id(1)
    sk = tl.program_id(2)  # split-K: this program reduces every SPLIT-th chunk from the sk-th
    num_pid_m = tl.cdiv(M, BLOCK_M)
    pid_m, pid_n = tile_ids(M=M, N=K_G, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_M=GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < K_G
    chan = g * K_G + offs_n
    # OHWI: output channel chan's R*S*C_G weights are contiguous (C_G = PACK when packed)
    w_col = chan * (R * S * (PACK if PACK else C_G))
    if INT64:
        offs_m = offs_m.to(tl.int64)
    img, p, q = pixel_coords(offs_m, P, Q)

    # Main conv: ONE loop over (tap, channel chunk) steps, taps (r, s) outer, chunks of the
    # group's input channels inner; with PACK, over (row r, chunk of the row's (s, c) pairs)
    # (weight offsets r*S*C_G + s*C_G + c). Flat, not `for r: for s: for c0:`: Triton
    # software-pipelines only the innermost loop of a nest and drains it after each outer
    # iteration, so with 1-2 chunks a tap nothing would overlap (sm_90a TTGIR:
    # warp_group_dot_wait {pendings = 0} + async_wait {num = 0} per tap). Split-K: this
    # program takes chunks sk, sk + SPLIT, ... of each tap, STEPS = ceil(chunks / SPLIT) a
    # tap; a step past the last chunk (chunks not a multiple of SPLIT) loads nothing (masked)
    # and adds zeros. The bound is a scalar of the arguments, never of tl.program_id (the
    # Triton 3.6 interpreter cannot take a tensor range bound). STEPS >= 1 (max(., 1), a no-op
    # since C_G >= 1) lets the compiler drop the zero-trip guard around the pipelined loop:
    # with it, ptxas 3.6 serialized split-K's wgmma (C7515, a gsb0 wait after every HGMMA).
    # Flattened loops at num_warps=8 have miscompiled in some Triton versions (triton#1254,
    # pytorch#173068): the GPU script checks the picked configs against F.conv2d first.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ih0 = p * stride_h - pad_h
    iw0 = q * stride_w - pad_w
    img_h = img * H
    if PACK:  # few channels a group: one K axis over (s, c), so MMA lanes are not padding
        # PACK = the channels a group (a constexpr: the divisions below are shifts); ROW: one
        # group and no column dilation, so a kernel row's (s, c) pairs are S*PACK contiguous
        # elements of the input row (the stem, its input padded to 4 channels by the
        # launcher: 8-byte aligned runs of 4, which the compiler copies asynchronously).
        # STEPS: chunks of a kernel row for this split, a constexpr (1 for the stem, so the
        # column bounds and channel masks below do not change from step to step).
        STEPS: tl.constexpr = max(((S * PACK + BLOCK_K - 1) // BLOCK_K + SPLIT - 1) // SPLIT, 1)
        ih0 = tl.where(mask_m, ih0, H)
        if ROW:  # the row's (s, c) run starts at input column iw0: one offset a row
            a_ptrs = x_ptr + (((img_h + ih0) * W + iw0) * PACK)[:, None] + offs_k[None, :]
        b_ptrs = w_ptr + w_col[None, :] + offs_k[:, None]
        r_i = 0
        c_i = 0
        for it in range(0, R * STEPS):
            k0 = (c_i * SPLIT + sk) * BLOCK_K
            ks = k0 + offs_k
            k_ok = ks < S * PACK
            ih = ih0 + r_i * dil_h
            iw = iw0[:, None] + (ks // PACK)[None, :] * dil_w
            if PAD0:  # no padding: every tap of an output pixel is inside the input
                ok = mask_m[:, None] & k_ok[None, :]
            else:
                ok = ((ih.to(tl.uint32) < H.to(tl.uint32))[:, None] & k_ok[None, :]
                      & (iw.to(tl.uint32) < W.to(tl.uint32)))
            if ROW:
                a = tl.load(a_ptrs + (r_i * dil_h * W * PACK + k0), mask=ok, other=0.0)
            else:
                a_off = ((img_h + ih) * W)[:, None] * C + iw * C + g * PACK \
                    + (ks % PACK)[None, :]
                a = tl.load(x_ptr + a_off, mask=ok, other=0.0)
            if EVEN_N:
                b = tl.load(b_ptrs + (r_i * S * PACK + k0), mask=k_ok[:, None], other=0.0)
            else:
                b = tl.load(b_ptrs + (r_i * S * PACK + k0),
                            mask=k_ok[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)
            c_i += 1
            next_row = c_i == STEPS
            c_i = tl.where(next_row, 0, c_i)
            r_i += next_row.to(tl.int32)
    else:
        # Loop-invariant per-row state, so an iteration adds scalars: the row's input offset
        # at tap (0, 0) (negative or past the image where the tap is padding: such rows are
        # masked), and, for the bounds, the tap-(0, 0) row and column; a row past M gets a
        # row of H, out of bounds at every tap. Bounds are one unsigned compare each.
        # EVEN_K / EVEN_N (the launcher's): every chunk is whole, so loads need no channel
        # mask. The tap (r, s) and chunk index are carried from step to step, never divided
        # out of the step number.
        if GEMM:  # 1x1, stride 1, no padding: output pixel m reads input pixel m
            a_ptrs = x_ptr + (offs_m * C + g * C_G)[:, None] + offs_k[None, :]
        else:
            ih0 = tl.where(mask_m, ih0, H)
            a_ptrs = x_ptr + (((img_h + ih0) * W + iw0) * C + g * C_G)[:, None] \
                + offs_k[None, :]
        b_ptrs = w_ptr + w_col[None, :] + offs_k[:, None]
        if JOINT:  # the projection shortcut in the same loop: step it, its chunk it
            offs_k2 = tl.arange(0, BLOCK_K2)
            a2_ptrs = x2_ptr + (((img * H2 + p * stride2) * W2 + q * stride2) * C2)[:, None] \
                + offs_k2[None, :]
            b2_ptrs = w2_ptr + (chan * C2)[None, :] + offs_k2[:, None]
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        STEPS = tl.maximum(tl.cdiv(tl.cdiv(C_G, BLOCK_K), SPLIT), 1)
        r_i = 0
        s_i = 0
        c_i = 0
        for it in range(0, R * S * STEPS):
            c0 = (c_i * SPLIT + sk) * BLOCK_K
            if GEMM:
                a_mask = mask_m[:, None]
                a_off = c0
            else:
                dh = r_i * dil_h
                dw = s_i * dil_w
                if PAD0:  # no padding: every tap of an output pixel is inside the input
                    a_mask = mask_m[:, None]
                else:
                    a_mask = (((ih0 + dh).to(tl.uint32) < H.to(tl.uint32))
                              & ((iw0 + dw).to(tl.uint32) < W.to(tl.uint32)))[:, None]
                a_off = (dh * W + dw) * C + c0
            if EVEN_K:
                a = tl.load(a_ptrs + a_off, mask=a_mask, other=0.0)
            else:
                c_ok = (c0 + offs_k) < C_G
                a = tl.load(a_ptrs + a_off, mask=a_mask & c_ok[None, :], other=0.0)
            b_off = (r_i * S + s_i) * C_G + c0
            if EVEN_K:
                if EVEN_N:
                    b = tl.load(b_ptrs + b_off)
                else:
                    b = tl.load(b_ptrs + b_off, mask=mask_n[None, :], other=0.0)
            else:
                b = tl.load(b_ptrs + b_off, mask=c_ok[:, None] & mask_n[None, :], other=0.0)
            acc = _mma(a, b, acc, UPCAST=UPCAST, PRECISION=PRECISION)
            if JOINT:  # whole chunks (the launcher's condition): only the rows' and N's masks
                a2 = tl.load(a2_ptrs + it * BLOCK_K2, mask=mask_m[:, None], other=0.0)
                if EVEN_N:
                    b2 = tl.load(b2_ptrs + it * BLOCK_K2)
                else:
                    b2 = tl.load(b2_ptrs + it * BLOCK_K2, mask=mask_n[None, :], other=0.0)
                acc2 = _mma(a2, b2, acc2, UPCAST=UPCAST, PRECISION=PRECISION)
            c_i, s_i, r_i, _ = next_step(c_i, s_i, r_i, STEPS, S)

    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT > 1:  # fp32 partial sums; splitk_epilogue_kernel adds them up in order
        tl.store(part_ptr + (sk * M + offs_m)[:, None] * K + chan[None, :], acc, mask=out_mask)

    # Projection shortcut: a 1x1 strided conv of the block input into its own accumulator
    # (its BN scale differs from the main conv's). JOINT (a 1x1 main conv whose chunk count
    # the shortcut's matches with chunks of BLOCK_K2: ResNet's Bottleneck conv3): reduced in
    # the main loop above, one pipeline; else a second loop here.
    if HAS_SHORTCUT and not JOINT:
        x2_row = ((img * H2 + p * stride2) * W2 + q * stride2) * C2
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c0 in range(sk * BLOCK_K, C2, SPLIT * BLOCK_K):
            cs = c0 + offs_k
            c_ok = cs < C2
            a = tl.load(x2_ptr + x2_row[:, None] + cs[None, :],
                        mask=mask_m[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w2_ptr + (chan * C2)[None, :] + cs[:, None],
                        mask=c_ok[:, None] & mask_n[None, :], other=0.0)
            acc2 = _mma(a, b, acc2, UPCAST=UPCAST, PRECISION=PRECISION)
        if SPLIT > 1:  # planes SPLIT..2*SPLIT-1 of the partials
            tl.store(part_ptr + ((SPLIT + sk) * M + offs_m)[:, None] * K + chan[None, :], acc2,
                     mask=out_mask)

    if SPLIT == 1:
        acc = bn_affine(acc=acc, chan=chan, mask_n=mask_n, bias_ptr=bias_ptr,
                        gamma_ptr=gamma_ptr, beta_ptr=beta_ptr, mean_ptr=mean_ptr,
                        var_ptr=var_ptr, eps=eps, HAS_BIAS=HAS_BIAS, HAS_BN=HAS_BN,
                        AFFINE=BN_AFFINE)
        if HAS_SHORTCUT:
            acc += bn_affine(acc=acc2, chan=chan, mask_n=mask_n, bias_ptr=bias_ptr,
                             gamma_ptr=gamma2_ptr, beta_ptr=beta2_ptr, mean_ptr=mean2_ptr,
                             var_ptr=var2_ptr, eps=eps2, HAS_BIAS=False, HAS_BN=True,
                             AFFINE=SC_AFFINE)
        _epilogue(out=acc, offs_m=offs_m, chan=chan, mask_m=mask_m, mask_n=mask_n, img=img, p=p,
                  q=q, res_ptr=res_ptr, y_ptr=y_ptr, stats_ptr=stats_ptr, K=K, RH=RH, RW=RW,
                  RC=RC, res_step=res_step, res_off=res_off, pid_m=pid_m, num_pid_m=num_pid_m,
                  HAS_RES=HAS_RES, RELU=RELU, WITH_STATS=WITH_STATS)


@triton.jit(do_not_specialize=["M"])
def splitk_epilogue_kernel(
    part_ptr, y_ptr, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
    gamma2_ptr, beta2_ptr, mean2_ptr, var2_ptr, eps2, res_ptr,
    M, K, P, Q, RH, RW, RC, res_step, res_off,
    HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, BN_AFFINE: tl.constexpr,
    HAS_SHORTCUT: tl.constexpr, SC_AFFINE: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, INT64: tl.constexpr, SPLIT: tl.constexpr,
    SPLITK_BLOCK_M: tl.constexpr, SPLITK_BLOCK_N: tl.constexpr,
):
    """y = epilogue(sum_{s < SPLIT} part[s] with the main BN (+ sum_{s < SPLIT} part[SPLIT + s]
    with the shortcut's BN)): split-K's (M, K) fp32 partial sums, added in a fixed order."""
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
    out = bn_affine(acc=acc, chan=chan, mask_n=mask_n, bias_ptr=bias_ptr, gamma_ptr=gamma_ptr,
                    beta_ptr=beta_ptr, mean_ptr=mean_ptr, var_ptr=var_ptr, eps=eps,
                    HAS_BIAS=HAS_BIAS, HAS_BN=HAS_BN, AFFINE=BN_AFFINE)
    if HAS_SHORTCUT:
        acc2 = tl.zeros((SPLITK_BLOCK_M, SPLITK_BLOCK_N), dtype=tl.float32)
        for sk in range(SPLIT, 2 * SPLIT):
            acc2 += tl.load(part_ptr + (sk * M + offs_m)[:, None] * K + chan[None, :],
                            mask=mask, other=0.0)
        out += bn_affine(acc=acc2, chan=chan, mask_n=mask_n, bias_ptr=bias_ptr,
                         gamma_ptr=gamma2_ptr, beta_ptr=beta2_ptr, mean_ptr=mean2_ptr,
                         var_ptr=var2_ptr, eps=eps2, HAS_BIAS=False, HAS_BN=True,
                         AFFINE=SC_AFFINE)
    img, p, q = pixel_coords(offs_m, P, Q)
    _epilogue(out=out, offs_m=offs_m, chan=chan, mask_m=mask_m, mask_n=mask_n, img=img, p=p, q=q,
              res_ptr=res_ptr, y_ptr=y_ptr, stats_ptr=y_ptr, K=K, RH=RH, RW=RW, RC=RC,
              res_step=res_step, res_off=res_off, pid_m=0, num_pid_m=1, HAS_RES=HAS_RES,
              RELU=RELU, WITH_STATS=False)


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
def _channel_vec(ptr, chan, mask_n):
    return tl.load(ptr + chan, mask=mask_n, other=0.0).to(tl.float32)


@triton.jit
def bn_affine(acc, chan, mask_n, bias_ptr, gamma_ptr, beta_ptr, mean_ptr, var_ptr, eps,
              HAS_BIAS: tl.constexpr, HAS_BN: tl.constexpr, AFFINE: tl.constexpr):
    """acc * scale[chan] + shift[chan] on an fp32 tile of conv sums, with scale and shift in
    fp32 from the conv bias and the live BatchNorm state (module docstring):
    scale = (gamma or 1) / sqrt(var + eps), shift = (beta or 0) + ((bias or 0) - mean) * scale;
    without BN, acc (+ bias)."""
    if HAS_BN:
        scale = 1.0 / tl.sqrt_rn(_channel_vec(var_ptr, chan, mask_n) + eps)
        if AFFINE:
            scale = scale * _channel_vec(gamma_ptr, chan, mask_n)
        shift = -_channel_vec(mean_ptr, chan, mask_n)
        if HAS_BIAS:
            shift += _channel_vec(bias_ptr, chan, mask_n)
        shift = shift * scale
        if AFFINE:
            shift += _channel_vec(beta_ptr, chan, mask_n)
        acc = acc * scale[None, :] + shift[None, :]
    elif HAS_BIAS:
        acc += _channel_vec(bias_ptr, chan, mask_n)[None, :]
    return acc


@triton.jit
def _epilogue(out, offs_m, chan, mask_m, mask_n, img, p, q, res_ptr, y_ptr, stats_ptr, K,
              RH, RW, RC, res_step, res_off, pid_m, num_pid_m,
              HAS_RES: tl.constexpr, RELU: tl.constexpr, WITH_STATS: tl.constexpr):
    """Residual, ReLU; one rounding on store; BN statistics."""
    if HAS_RES:
        out += load_residual(res_ptr=res_ptr, img=img, p=p, q=q, chan=chan, mask_m=mask_m,
                             mask_n=mask_n, RH=RH, RW=RW, RC=RC, res_step=res_step,
                             res_off=res_off)
    if RELU:
        out = tl.where(out < 0.0, 0.0, out)  # NaN stays NaN, as torch.relu
    y_mask = mask_m[:, None] & mask_n[None, :]
    y = out.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + offs_m[:, None] * K + chan[None, :], y, mask=y_mask)
    if WITH_STATS:  # (count, mean, M2) of this tile's stored outputs: part[:, pid_m, chan]
        y = tl.where(y_mask, y.to(tl.float32), 0.0)
        cnt = tl.sum(mask_m.to(tl.float32), axis=0)
        mean = tl.sum(y, axis=0) / cnt
        m2 = tl.sum(tl.where(y_mask, (y - mean[None, :]) * (y - mean[None, :]), 0.0), axis=0)
        part = stats_ptr + pid_m * K + chan
        tl.store(part + PARTIAL_COUNT * num_pid_m * K, tl.zeros_like(mean) + cnt, mask=mask_n)
        tl.store(part + PARTIAL_MEAN * num_pid_m * K, mean, mask=mask_n)
        tl.store(part + PARTIAL_M2 * num_pid_m * K, m2, mask=mask_n)


def packs_taps(c_per_group: int, s: int) -> bool:
    """Whether the kernel reduces over (s, c) pairs of a kernel row instead of tap by tap:
    for fewer than 16 channels a group (the 7x7 stem's 3, ResNeXt's 4), where a channel chunk
    of at least 16 (the tensor cores' K) would be mostly padding."""
    return s > 1 and c_per_group < 16


_JOINT: dict = {}  # (C, C2, config, bytes) -> joint_shortcut's answer


def joint_shortcut(c_main: int, c_shortcut: int, cfg, elem_bytes: int) -> Optional[int]:
    """The shortcut's chunk (BLOCK_K2 = cfg.BLOCK_K) when a 1x1 main conv and its projection
    shortcut can share one reduction loop (JOINT): whole chunks on both sides and the same
    number of them, the main conv's chunk c_main / chunks a power of two of at least 16 (the
    tensor cores' K): ResNet's Bottleneck conv3 (C = 64..512, shortcut 64..1024: chunks of 32
    or 64 against 64), and the stages still fit SMEM_BUDGET. None otherwise."""
    bk2 = cfg.BLOCK_K
    if c_shortcut % bk2:
        return None
    chunks = c_shortcut // bk2
    if c_main % chunks:
        return None
    bk1 = c_main // chunks
    if bk1 < 16 or bk1 & (bk1 - 1) or bk1 > bk2:
        return None
    stage = (cfg.BLOCK_M + cfg.BLOCK_N) * (bk1 + bk2) * elem_bytes
    return bk2 if cfg.num_stages * stage <= configs.SMEM_BUDGET else None


def even_k(c_per_group: int, block_k: int, split: int) -> bool:
    """Whether every (split-K share of) channel chunk is whole: no channel masks (EVEN_K)."""
    return c_per_group % block_k == 0 and (c_per_group // block_k) % split == 0


@triton.jit(do_not_specialize=["NPIX"])
def pad_nhwc_kernel(x_ptr, y_ptr, NPIX, H, W, C, HP, WP, pad_h, pad_w, CP,
                    CP_BLOCK: tl.constexpr, INT64: tl.constexpr, BLOCK: tl.constexpr):
    """y[n, h, v, c] = x[n, h - pad_h, v - pad_w, c] inside x and c < C, else 0: an NHWC
    input zero-padded in space and to CP channels (y is NPIX = N*HP*WP pixels of CP;
    CP_BLOCK: CP rounded up to a power of two)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NPIX
    if INT64:
        offs = offs.to(tl.int64)
    img, hh, vv = pixel_coords(offs, HP, WP)
    ih = hh - pad_h
    iw = vv - pad_w
    inside = ok & (ih.to(tl.uint32) < H.to(tl.uint32)) & (iw.to(tl.uint32) < W.to(tl.uint32))
    c = tl.arange(0, CP_BLOCK)
    v = tl.load(x_ptr + (((img * H + ih) * W + iw) * C)[:, None] + c[None, :],
                mask=inside[:, None] & (c < C)[None, :], other=0.0)
    tl.store(y_ptr + (offs * CP)[:, None] + c[None, :], v, mask=ok[:, None] & (c < CP)[None, :])


PAD_BLOCK = 256  # pad_nhwc_kernel's pixels a program


def pad_input(x: torch.Tensor, channels: int, padding) -> torch.Tensor:
    """x (N, C, H, W) channels_last-dense, zero-padded by ``padding`` (ph, pw) in space and
    to ``channels`` channels, channels_last: one pass (``pad_nhwc_kernel``). Also a conv
    weight (K, C, R, S) in the kernels' layout (OHWI is NHWC with K as the batch)."""
    n, c, h, w = x.shape
    hp, wp = h + 2 * padding[0], w + 2 * padding[1]
    y = torch.empty((n, channels, hp, wp), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    npix = n * hp * wp
    pad_nhwc_kernel[(-(-npix // PAD_BLOCK),)](
        x, y, npix, h, w, c, hp, wp, padding[0], padding[1], channels,
        CP_BLOCK=triton.next_power_of_2(channels), INT64=needs_int64(x, y), BLOCK=PAD_BLOCK)
    return y


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _bn_args(bn: BNParams, placeholder: torch.Tensor) -> tuple:
    """(gamma, beta, mean, var, eps) kernel arguments of a BNParams."""
    assert (bn.weight is None) == (bn.bias is None), "BN weight and bias: both or neither"
    return (placeholder if bn.weight is None else bn.weight,
            placeholder if bn.bias is None else bn.bias, bn.mean, bn.var, float(bn.eps))


def conv_fused(x, w, *, stride, padding, dilation, groups, relu, conv_bias=None, bn=None,
               residual=None, res_step=1, res_off=0, shortcut=None, shortcut_w=None,
               shortcut_stride=1, shortcut_bn=None, with_stats=False, config=None, split=None):
    """Launch ``conv_fused_kernel`` (module docstring for the math). Returns y as an
    (N, K, P, Q) channels_last tensor of x's dtype; with ``with_stats``, (y, partials):
    partials (3, T, K) fp32 holds each M-tile's per-channel (count, mean, M2) of the stored
    y (rows ``bn_rows.PARTIAL``), for ``kernels.bn.bn_merge`` (T = number of M tiles).

    x: (N, C, H, W) channels_last-dense, fp32/fp16/bf16; w: (K, C/groups, R, S) in the
    kernels' layout (``kernel_weight``), x's dtype; conv_bias: (K,) or None; bn: ``BNParams``
    or None; residual: (N, RC, RH, RW) channels_last-dense or None; shortcut: the block input
    (N, C2, H2, W2) channels_last-dense with shortcut_w (K, C2, 1, 1) in the kernels' layout
    and shortcut_bn its ``BNParams``, or None. ``with_stats`` (the training forward) takes
    neither bn nor a shortcut. The caller validates shapes, dtypes and devices
    (``fastres.ops``); the launcher decides the dot's precision (``dot_flags``) and int64
    indexing (``needs_int64``). ``config``: a ``ConvConfig`` to use instead of
    ``pick_config``'s (autotune passes its candidates here); ``split``: a split-K factor
    instead of ``split_k``'s (which splits only on a GPU, when the tiles cannot fill it).
    """
    args = dict(locals())
    assert w.dtype == x.dtype and w.is_contiguous(memory_format=torch.channels_last), \
        "w: x's dtype, channels_last (kernel_weight)"
    assert (shortcut is None) == (shortcut_w is None) == (shortcut_bn is None), \
        "a shortcut needs shortcut_w and shortcut_bn"
    assert not (with_stats and (bn is not None or shortcut is not None)), \
        "with_stats: the raw conv, without bn or a shortcut"
    n, c, h, wd = x.shape
    k, _, r, s = w.shape
    p = out_size(h, r, stride[0], padding[0], dilation[0])
    q = out_size(wd, s, stride[1], padding[1], dilation[1])
    y = torch.empty((n, k, p, q), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    m = n * p * q
    if m == 0 or k == 0:
        return (y, y.new_zeros((3, 0, k), dtype=torch.float32)) if with_stats else y
    c_g, k_g = c // groups, k // groups
    pack = packs_taps(c_g, s)
    if pack and groups == 1 and c % 4:
        # The stem's 3 channels: rows of 4, and the spatial padding too, in one pass: the
        # kernel then reads 8-byte runs without bounds checks (PAD0; module docstring).
        c = c + (-c % 4)
        x, w, c_g = pad_input(x, c, padding), pad_input(w, c, (0, 0)), c
        h, wd, padding = x.shape[2], x.shape[3], (0, 0)
    taps = r if pack else r * s  # reduction steps of BLOCK_K chunks: rows when packed
    chunk = s * c_g if pack else c_g
    if shortcut is not None and shortcut.shape[1] > chunk:
        chunk = shortcut.shape[1]
    cfg = config or pick_config(  # autotune (FASTRES_AUTOTUNE=1) times launch(cfg)
        m, k_g, chunk, x.itemsize, taps,
        launch=lambda cfg: conv_fused(**dict(args, config=cfg)), shortcut=shortcut is not None,
        packed=pack and groups == 1, stride=max(stride) if r == s == 1 else 1)
    tiles_m = -(-m // cfg.BLOCK_M)  # ceiling divisions
    tiles = tiles_m * -(-k_g // cfg.BLOCK_N)
    if split is None:
        sms = gpu_sms(x.device)
        split = 1 if with_stats or sms is None else split_k(
            tiles * groups, -(-chunk // cfg.BLOCK_K), taps, sms)
    gemm = r == s == 1 and stride[0] == stride[1] == 1 and padding[0] == padding[1] == 0
    joint = None
    if shortcut is not None and gemm and split == 1 and groups == 1:
        key = (c_g, shortcut.shape[1], cfg, x.itemsize)  # memoized: no host call a launch
        joint = _JOINT.get(key, _JOINT)
        if joint is _JOINT:
            joint = _JOINT[key] = joint_shortcut(*key)
    block_k = cfg.BLOCK_K if joint is None else c_g // (shortcut.shape[1] // joint)
    stats = part = y
    if with_stats:
        stats = torch.empty((3, tiles_m, k), dtype=torch.float32, device=x.device)
    if split > 1:  # a shortcut keeps its own partials: a second set of SPLIT planes
        planes = split * (2 if shortcut is not None else 1)
        part = torch.empty((planes, m, k), dtype=torch.float32, device=x.device)
    rc, rh, rw = residual.shape[1:] if residual is not None else (0, 0, 0)
    c2, h2, w2 = shortcut.shape[1:] if shortcut is not None else (0, 0, 0)
    upcast, precision = dot_flags(x.dtype)
    bias = x if conv_bias is None else conv_bias
    bn_args = (x, x, x, x, 0.0) if bn is None else _bn_args(bn, x)
    sc_args = (x, x, x, x, 0.0) if shortcut_bn is None else _bn_args(shortcut_bn, x)
    flags = dict(HAS_BIAS=conv_bias is not None, HAS_BN=bn is not None,
                 BN_AFFINE=bn is not None and bn.weight is not None,
                 HAS_SHORTCUT=shortcut is not None,
                 SC_AFFINE=shortcut_bn is not None and shortcut_bn.weight is not None,
                 HAS_RES=residual is not None, RELU=relu,
                 INT64=needs_int64(x, y, residual, shortcut, part if split > 1 else None))
    conv_fused_kernel[(tiles, groups, split)](
        x, w, y, bias, *bn_args,
        x if shortcut is None else shortcut, w if shortcut_w is None else shortcut_w, *sc_args,
        x if residual is None else residual, stats, part,
        h, wd, c, p, q, m, k, c_g, k_g,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        rh, rw, rc, res_step, res_off,
        h2, w2, c2, shortcut_stride,
        R=r, S=s, **flags, UPCAST=upcast, PRECISION=precision, WITH_STATS=with_stats,
        GEMM=gemm,
        PACK=c_g if pack else 0, ROW=pack and groups == 1 and dilation[1] == 1, SPLIT=split,
        EVEN_K=even_k(c_g, block_k, split),
        EVEN_N=k_g % cfg.BLOCK_N == 0, PAD0=padding[0] == padding[1] == 0,
        JOINT=joint is not None, BLOCK_K2=joint or cfg.BLOCK_K,
        **dict(cfg.kwargs, BLOCK_K=block_k),
    )
    if split > 1:
        splitk_epilogue_kernel[(-(-m // SPLITK_BLOCK_M), -(-k // SPLITK_BLOCK_N))](
            part, y, bias, *bn_args, *sc_args,
            y if residual is None else residual,
            m, k, p, q, rh, rw, rc, res_step, res_off,
            **flags, SPLIT=split, SPLITK_BLOCK_M=SPLITK_BLOCK_M, SPLITK_BLOCK_N=SPLITK_BLOCK_N)
    return (y, stats) if with_stats else y
