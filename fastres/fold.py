"""BatchNorm folding for inference, with a cache that can never go stale.

For eval-mode BatchNorm, ``bn(conv(x)) = conv(x, W * scale) + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``
(plus ``scale * conv.bias``). The folded weights are stored in the kernel's layout
(R*S*C/groups, K) in the activation dtype; the shift stays fp32.

The cache lives on the conv module and is keyed on the identity, storage and version counter
of every tensor it was computed from, so any in-place update (optimizer step, BN running
stats in train mode, ``load_state_dict``) or replacement invalidates it. While a CUDA graph
is being captured the fold is not cached but recorded into the graph, which then folds from
the live parameters on every replay: a cached copy would be baked into the graph and go
stale after an in-place update (and one first computed during capture holds no values).
"""
import torch
import torch.nn as nn


def bn_scale_shift(bn: nn.BatchNorm2d):
    """fp32 (scale, shift) of an eval-mode BatchNorm with running statistics."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    shift = -bn.running_mean.float() * scale
    if bn.affine:
        scale = scale * bn.weight.float()
        shift = shift * bn.weight.float() + bn.bias.float()
    return scale, shift


def fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, for_triton: bool = True):
    """(w_kn, shift): conv weights scaled by BN as an (R*S*C_g, K) matrix.

    For the Triton kernel w_kn is contiguous (K innermost). For the plain-PyTorch path it is
    the transposed view of an OHWI-contiguous (K, R*S*C_g) tensor: the same shape, and the
    memory the CPU convolution reads without a weight reorder on every call.
    """
    scale, shift = bn_scale_shift(bn)
    w = conv.weight.float() * scale[:, None, None, None]
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    if for_triton:
        w_kn = w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).to(dtype).contiguous()
    else:
        w_kn = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).to(dtype).contiguous().t()
    return w_kn, shift.contiguous()


def _sources(*modules):
    for m in modules:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            yield t


def _key(modules, dtype, device):
    parts = [dtype, device] + [getattr(m, "eps", None) for m in modules]
    for t in _sources(*modules):
        parts.append((id(t), t.data_ptr(), t._version, t.device, t.dtype))
    return tuple(parts)


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never without CUDA initialized)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype, projection=None,
           for_triton: bool = True):
    """Folded (w_kn, shift, w2_kn) for conv+bn, and the projection (conv, bn) if given, whose
    shift is added into ``shift`` and whose 1x1 weights come back as (C2, K) in w2_kn; laid
    out for the Triton kernel or for the plain-PyTorch path (``fold``).

    Cached on ``conv`` unless autograd needs the fold itself (then computed inline so
    gradients reach the conv and BN parameters), torch.compile is tracing or a CUDA graph
    is being captured.
    """
    modules = (conv, bn) + (tuple(projection) if projection is not None else ())
    tracked = torch.is_grad_enabled() and any(t.requires_grad for t in _sources(*modules))
    cacheable = not tracked and not torch.compiler.is_compiling() and not capturing()
    if cacheable:
        key = _key(modules, dtype, conv.weight.device) + (for_triton,)
        hit = conv.__dict__.get("_fastres_fold")
        if hit is not None and hit[0] == key:
            return hit[1]
    with torch.inference_mode(False):
        w_kn, shift = fold(conv, bn, dtype, for_triton)
        w2_kn = None
        if projection is not None:
            w2_kn, shift2 = fold(projection[0], projection[1], dtype, for_triton)
            shift = shift + shift2
    out = (w_kn, shift, w2_kn)
    if cacheable:
        conv.__dict__["_fastres_fold"] = (key, out)
    return out
