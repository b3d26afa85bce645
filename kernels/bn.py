"""Training-mode BatchNorm around the conv kernel: statistics, apply, backward.

Activations are NHWC, seen as (M, C) matrices (M = N*H*W pixels, C contiguous). All
statistics and reductions are fp32 and deterministic (fixed tile order, no atomics).

Rows of the statistics tensors (partials, merged, stats, sums): ``bn_rows``.

Forward, for the raw conv output x (M, C):
  ``bn_merge``  per-tile (count n_t, mean m_t, M2_t) -> per-channel (n, mean, M2), merged with
                Chan's parallel formula (a chunk of tiles at once:
                mean = sum n_t m_t / n, M2 = sum M2_t + n_t (m_t - mean)^2, then pairwise into
                the running total), so no sum-of-squares cancellation. Also writes
                (mean, invstd = 1/sqrt(M2/n + eps), n) and, optionally, updates running stats
                like nn.BatchNorm2d: r_mean += f (mean - r_mean), r_var += f (M2/(n-1) - r_var),
                f = momentum, or 1/num_batches_tracked when momentum is None.
  ``bn_act``    y = relu?( (x - mean) invstd gamma + beta                    (main BN)
                          (+ (x2 - mean2) invstd2 gamma2 + beta2)            (projection BN)
                          (+ res[n, p*step, q*step, c - off]) )              (residual, 0 outside)
Backward, with dz = dy * (y > 0) (or dy without ReLU) and xhat = (x - mean) invstd:
  ``bn_bwd_reduce``  per-channel sum(dz), sum(dz xhat) (and sum(dz xhat2) for the shortcut)
  ``bn_bwd_dx``      dx = gamma invstd (dz - sum(dz)/n - xhat sum(dz xhat)/n) (same for x2),
                     and dz itself for the residual branch.
"""
import torch
import triton
import triton.language as tl

from .bn_rows import (PARTIAL_COUNT, PARTIAL_M2, PARTIAL_MEAN, STATS_COUNT, STATS_INVSTD,
                      STATS_MEAN, SUMS_DZ, SUMS_DZ_XHAT, SUMS_DZ_XHAT2)
from .conv import load_residual, needs_int64, pixel_coords

BLOCK_M = 64
BLOCK_C = 32
BLOCK_T = 32
MERGE_ROWS = 512  # per-tile statistics one merge program folds in
REDUCE_ROWS = 256  # at most this many partial rows from the backward reduction


def _grid(m, c):
    return -(-m // BLOCK_M), -(-c // BLOCK_C)  # ceiling divisions


@triton.jit(do_not_specialize=["T"])
def bn_merge_kernel(part_ptr, out_ptr, stats_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                    T, C, ROWS, momentum, eps,
                    STATS: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge tiles [pid_t*ROWS, (pid_t+1)*ROWS) of part (3, T, C) into tile pid_t of out."""
    pid_t = tl.program_id(0)
    t_out = tl.num_programs(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    end = min(pid_t * ROWS + ROWS, T)
    for t0 in range(pid_t * ROWS, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < end)[:, None] & mask_c[None, :]
        idx = offs_t[:, None] * C + offs_c[None, :]
        n_t = tl.load(part_ptr + PARTIAL_COUNT * T * C + idx, mask=ok, other=0.0)
        mean_t = tl.load(part_ptr + PARTIAL_MEAN * T * C + idx, mask=ok, other=0.0)
        m2_t = tl.load(part_ptr + PARTIAL_M2 * T * C + idx, mask=ok, other=0.0)
        n_b = tl.sum(n_t, axis=0)
        safe_b = tl.where(n_b > 0, n_b, 1.0)
        mean_b = tl.sum(n_t * mean_t, axis=0) / safe_b
        dev = mean_t - mean_b[None, :]
        m2_b = tl.sum(m2_t + n_t * dev * dev, axis=0)
        n_ab = n + n_b
        safe_ab = tl.where(n_ab > 0, n_ab, 1.0)
        delta = mean_b - mean
        mean = mean + delta * (n_b / safe_ab)
        m2 = m2 + m2_b + delta * delta * (n * n_b / safe_ab)
        n = n_ab
    out = out_ptr + pid_t * C + offs_c
    tl.store(out + PARTIAL_COUNT * t_out * C, n, mask=mask_c)
    tl.store(out + PARTIAL_MEAN * t_out * C, mean, mask=mask_c)
    tl.store(out + PARTIAL_M2 * t_out * C, m2, mask=mask_c)
    n_safe = tl.where(n > 1.0, n, 2.0)  # masked channels; the host rejects n <= 1
    if STATS:
        tl.store(stats_ptr + STATS_MEAN * C + offs_c, mean, mask=mask_c)
        tl.store(stats_ptr + STATS_INVSTD * C + offs_c, 1.0 / tl.sqrt(m2 / n_safe + eps),
                 mask=mask_c)
        tl.store(stats_ptr + STATS_COUNT * C + offs_c, n, mask=mask_c)
    if UPDATE:
        if CUMULATIVE:
            f = 1.0 / tl.load(nbt_ptr).to(tl.float32)
        else:
            f = momentum
        rm = tl.load(rmean_ptr + offs_c, mask=mask_c).to(tl.float32)
        rv = tl.load(rvar_ptr + offs_c, mask=mask_c).to(tl.float32)
        rm = (1.0 - f) * rm + f * mean
        rv = (1.0 - f) * rv + f * (m2 / (n_safe - 1.0))
        tl.store(rmean_ptr + offs_c, rm.to(rmean_ptr.dtype.element_ty), mask=mask_c)
        tl.store(rvar_ptr + offs_c, rv.to(rvar_ptr.dtype.element_ty), mask=mask_c)


def bn_merge(partials, eps=None, running_mean=None, running_var=None,
             num_batches_tracked=None, momentum=0.1, rows_per_program=MERGE_ROWS):
    """partials (3, T, C) fp32 (count, mean, M2) per tile -> (merged (3, C), stats (3, C)):
    merged = per-channel (count, mean, M2) (rows ``PARTIAL``), stats = (mean, invstd, count)
    (rows ``STATS``), None without
    ``eps`` (a partial merge, e.g. before the ranks' results are gathered). With
    running_mean/var, update them in place (``momentum=None``: cumulative average over
    num_batches_tracked, which the caller has already incremented). A tree of passes, each
    program merging ``rows_per_program`` rows in order: deterministic, and parallel for the
    thousands of tiles of a large batch."""
    _, t, c = partials.shape
    stats = partials.new_empty((3, c)) if eps is not None else None
    update = running_mean is not None
    while True:
        t_out = max(1, -(-t // rows_per_program))
        final = t_out == 1
        out = partials.new_empty((3, t_out, c))
        bn_merge_kernel[(t_out, -(-c // BLOCK_C))](
            partials, out, stats if final and eps is not None else out,
            running_mean if final and update else out, running_var if final and update else out,
            num_batches_tracked if final and update and momentum is None else out,
            t, c, rows_per_program, 0.0 if momentum is None else momentum,
            eps if eps is not None else 0.0, STATS=final and eps is not None,
            UPDATE=final and update, CUMULATIVE=momentum is None, BLOCK_T=BLOCK_T,
            BLOCK_C=BLOCK_C)
        if final:
            return out[:, 0], stats
        partials, t = out, t_out


@triton.jit
def _normalize(x, stats_ptr, w_ptr, b_ptr, offs_c, mask_c, C, AFFINE: tl.constexpr):
    """(x - mean) invstd gamma + beta, in that order: x * scale + shift would round
    x * scale, which is large when the variance is small, before the cancellation."""
    mean = tl.load(stats_ptr + STATS_MEAN * C + offs_c, mask=mask_c, other=0.0)
    scale = tl.load(stats_ptr + STATS_INVSTD * C + offs_c, mask=mask_c, other=0.0)
    if AFFINE:
        scale *= tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = (x - mean[None, :]) * scale[None, :]
    if AFFINE:
        y += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit(do_not_specialize=["M"])
def bn_act_kernel(x_ptr, stats_ptr, w_ptr, b_ptr, x2_ptr, stats2_ptr, w2_ptr, b2_ptr,
                  res_ptr, y_ptr, M, C, P, Q, RH, RW, RC, res_step, res_off,
                  AFFINE: tl.constexpr, HAS_SC: tl.constexpr, AFFINE2: tl.constexpr,
                  HAS_RES: tl.constexpr, RELU: tl.constexpr, INT64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    if INT64:
        offs_m = offs_m.to(tl.int64)
    mask = mask_m[:, None] & mask_c[None, :]
    idx = offs_m[:, None] * C + offs_c[None, :]
    y = _normalize(x=tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32),
                   stats_ptr=stats_ptr, w_ptr=w_ptr, b_ptr=b_ptr, offs_c=offs_c, mask_c=mask_c,
                   C=C, AFFINE=AFFINE)
    if HAS_SC:
        y += _normalize(x=tl.load(x2_ptr + idx, mask=mask, other=0.0).to(tl.float32),
                        stats_ptr=stats2_ptr, w_ptr=w2_ptr, b_ptr=b2_ptr, offs_c=offs_c,
                        mask_c=mask_c, C=C, AFFINE=AFFINE2)
    if HAS_RES:
        img, p, q = pixel_coords(offs_m, P, Q)
        y += load_residual(res_ptr=res_ptr, img=img, p=p, q=q, chan=offs_c, mask_m=mask_m,
                           mask_n=mask_c, RH=RH, RW=RW, RC=RC, res_step=res_step,
                           res_off=res_off)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


def bn_act(x, stats, weight, bias, *, relu, shortcut=None, residual=None, res_step=1,
           res_off=0):
    """Launch ``bn_act_kernel``. x: raw conv output (N, C, P, Q) channels_last-dense; stats
    (3, C) from ``bn_merge``; weight/bias (C,) or None (affine=False); shortcut: None or
    (x2, stats2, weight2, bias2) of the projection branch, x2 shaped like x; residual:
    (N, RC, RH, RW) channels_last-dense. Returns y shaped and laid out like x."""
    n, c, p, q = x.shape
    m = n * p * q
    y = torch.empty_like(x)
    if m == 0 or c == 0:
        return y
    x2, stats2, w2, b2 = shortcut if shortcut is not None else (x, stats, None, None)
    rc, rh, rw = residual.shape[1:] if residual is not None else (0, 0, 0)
    bn_act_kernel[_grid(m, c)](
        x, stats, weight if weight is not None else stats, bias if bias is not None else stats,
        x2, stats2, w2 if w2 is not None else stats, b2 if b2 is not None else stats,
        residual if residual is not None else x, y, m, c, p, q, rh, rw, rc, res_step, res_off,
        AFFINE=weight is not None, HAS_SC=shortcut is not None, AFFINE2=w2 is not None,
        HAS_RES=residual is not None, RELU=relu, INT64=needs_int64(x, residual),
        BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return y


@triton.jit
def _dz(dy_ptr, y_ptr, idx, mask, RELU: tl.constexpr):
    dz = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        dz = tl.where(tl.load(y_ptr + idx, mask=mask, other=0.0) > 0, dz, 0.0)
    return dz


@triton.jit(do_not_specialize=["M"])
def bn_bwd_reduce_kernel(dy_ptr, y_ptr, x_ptr, stats_ptr, x2_ptr, stats2_ptr, part_ptr,
                         M, C, ROWS, RELU: tl.constexpr, HAS_SC: tl.constexpr,
                         INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Partial sums over pixel rows [pid*ROWS, (pid+1)*ROWS) into row pid of part."""
    pid = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean = tl.load(stats_ptr + STATS_MEAN * C + offs_c, mask=mask_c, other=0.0)
    s_dz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_dzx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s_dzx2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_SC:
        mean2 = tl.load(stats2_ptr + STATS_MEAN * C + offs_c, mask=mask_c, other=0.0)
    end = min(pid * ROWS + ROWS, M)
    for m0 in range(pid * ROWS, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if INT64:
            offs_m = offs_m.to(tl.int64)
        mask = (offs_m < end)[:, None] & mask_c[None, :]
        idx = offs_m[:, None] * C + offs_c[None, :]
        dz = _dz(dy_ptr=dy_ptr, y_ptr=y_ptr, idx=idx, mask=mask, RELU=RELU)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        s_dz += tl.sum(dz, axis=0)
        # sum(dz * (x - mean)) here; the invstd factor is applied after the reduction.
        s_dzx += tl.sum(dz * (x - mean[None, :]), axis=0)
        if HAS_SC:
            x2 = tl.load(x2_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            s_dzx2 += tl.sum(dz * (x2 - mean2[None, :]), axis=0)
    T = tl.num_programs(0)
    part = part_ptr + pid * C + offs_c
    tl.store(part + SUMS_DZ * T * C, s_dz, mask=mask_c)
    tl.store(part + SUMS_DZ_XHAT * T * C, s_dzx, mask=mask_c)
    if HAS_SC:
        tl.store(part + SUMS_DZ_XHAT2 * T * C, s_dzx2, mask=mask_c)


@triton.jit(do_not_specialize=["T"])
def column_sum_kernel(part_ptr, stats_ptr, stats2_ptr, out_ptr, T, C, HAS_SC: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[j, c] = sum_t part[j, t, c] in a fixed order; the xhat sums (rows SUMS_DZ_XHAT,
    SUMS_DZ_XHAT2) times invstd, invstd2."""
    j = tl.program_id(1)
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        ok = (offs_t < T)[:, None] & mask_c[None, :]
        acc += tl.sum(tl.load(part_ptr + j * T * C + offs_t[:, None] * C + offs_c[None, :],
                              mask=ok, other=0.0), axis=0)
    if j == SUMS_DZ_XHAT:
        acc *= tl.load(stats_ptr + STATS_INVSTD * C + offs_c, mask=mask_c, other=0.0)
    if HAS_SC:
        if j == SUMS_DZ_XHAT2:
            acc *= tl.load(stats2_ptr + STATS_INVSTD * C + offs_c, mask=mask_c, other=0.0)
    tl.store(out_ptr + j * C + offs_c, acc, mask=mask_c)


def bn_bwd_reduce(dy, y, x, stats, x2=None, stats2=None, *, relu, max_rows=REDUCE_ROWS):
    """Per-channel sums (sum dz, sum dz xhat[, sum dz xhat2]) as an fp32 (2 or 3, C) tensor
    (rows ``SUMS``): at most ``max_rows`` programs per channel block each sum a contiguous run
    of pixels, then one pass sums their rows in order (deterministic)."""
    n, c, p, q = x.shape
    m = n * p * q
    rows = 3 if x2 is not None else 2
    out = torch.zeros((rows, c), dtype=torch.float32, device=x.device)
    if m == 0 or c == 0:
        return out
    blocks = -(-m // BLOCK_M)  # ceiling divisions
    per_program = -(-blocks // max_rows) * BLOCK_M
    grid = (-(-m // per_program), -(-c // BLOCK_C))
    part = torch.empty((rows, grid[0], c), dtype=torch.float32, device=x.device)
    bn_bwd_reduce_kernel[grid](
        dy, y, x, stats, x2 if x2 is not None else x, stats2 if x2 is not None else stats,
        part, m, c, per_program, RELU=relu, HAS_SC=x2 is not None, INT64=needs_int64(x),
        BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    column_sum_kernel[(-(-c // BLOCK_C), rows)](
        part, stats, stats2 if x2 is not None else stats, out, grid[0], c,
        HAS_SC=x2 is not None, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C)
    return out


@triton.jit
def _dx(dz, x_ptr, stats_ptr, w_ptr, sums_ptr, XHAT_ROW: tl.constexpr, idx, mask, offs_c,
        mask_c, C, AFFINE: tl.constexpr):
    """BN's input gradient for one branch: its stats, gamma and row XHAT_ROW of sums."""
    mean = tl.load(stats_ptr + STATS_MEAN * C + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(stats_ptr + STATS_INVSTD * C + offs_c, mask=mask_c, other=0.0)
    inv_n = 1.0 / tl.load(stats_ptr + STATS_COUNT * C + offs_c, mask=mask_c, other=1.0)
    k = invstd
    if AFFINE:
        k *= tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    mean_dz = tl.load(sums_ptr + SUMS_DZ * C + offs_c, mask=mask_c, other=0.0) * inv_n
    mean_dzx = tl.load(sums_ptr + XHAT_ROW * C + offs_c, mask=mask_c, other=0.0) * inv_n
    xhat = (tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32) - mean[None, :]) \
        * invstd[None, :]
    return k[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzx[None, :])


@triton.jit(do_not_specialize=["M"])
def bn_bwd_dx_kernel(dy_ptr, y_ptr, x_ptr, stats_ptr, w_ptr, x2_ptr, stats2_ptr, w2_ptr,
                     sums_ptr, dx_ptr, dx2_ptr, dz_ptr, M, C,
                     RELU: tl.constexpr, AFFINE: tl.constexpr, HAS_SC: tl.constexpr,
                     AFFINE2: tl.constexpr, STORE_DZ: tl.constexpr, INT64: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if INT64:
        offs_m = offs_m.to(tl.int64)
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    idx = offs_m[:, None] * C + offs_c[None, :]
    dz = _dz(dy_ptr=dy_ptr, y_ptr=y_ptr, idx=idx, mask=mask, RELU=RELU)
    dx = _dx(dz=dz, x_ptr=x_ptr, stats_ptr=stats_ptr, w_ptr=w_ptr, sums_ptr=sums_ptr,
             XHAT_ROW=SUMS_DZ_XHAT, idx=idx, mask=mask, offs_c=offs_c, mask_c=mask_c, C=C,
             AFFINE=AFFINE)
    tl.store(dx_ptr + idx, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_SC:
        dx2 = _dx(dz=dz, x_ptr=x2_ptr, stats_ptr=stats2_ptr, w_ptr=w2_ptr, sums_ptr=sums_ptr,
                  XHAT_ROW=SUMS_DZ_XHAT2, idx=idx, mask=mask, offs_c=offs_c, mask_c=mask_c,
                  C=C, AFFINE=AFFINE2)
        tl.store(dx2_ptr + idx, dx2.to(dx2_ptr.dtype.element_ty), mask=mask)
    if STORE_DZ:
        tl.store(dz_ptr + idx, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def bn_bwd_dx(dy, y, x, stats, weight, sums, *, relu, shortcut=None, store_dz=False):
    """dx of the main BN (and dx2 of the projection BN, shortcut = (x2, stats2, weight2)),
    and dz = dReLU(dy) when ``store_dz`` (the residual's gradient). sums from
    ``bn_bwd_reduce`` (all-reduced for synchronized BN, whose stats then hold the global
    count).
    Returns (dx, dx2 or None, dz or None), each shaped and laid out like x."""
    n, c, p, q = x.shape
    m = n * p * q
    dx = torch.empty_like(x)
    dx2 = torch.empty_like(shortcut[0]) if shortcut is not None else None
    dz = torch.empty_like(dy) if store_dz else None
    if m == 0 or c == 0:
        return dx, dx2, dz
    x2, stats2, w2 = shortcut if shortcut is not None else (x, stats, None)
    bn_bwd_dx_kernel[_grid(m, c)](
        dy, y, x, stats, weight if weight is not None else stats, x2, stats2,
        w2 if w2 is not None else stats, sums, dx, dx2 if dx2 is not None else dx,
        dz if dz is not None else dx, m, c,
        RELU=relu, AFFINE=weight is not None, HAS_SC=shortcut is not None,
        AFFINE2=w2 is not None, STORE_DZ=store_dz, INT64=needs_int64(x),
        BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return dx, dx2, dz
