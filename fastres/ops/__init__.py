"""fastres' PyTorch custom ops over the Triton kernels, one file per op: the op, its fake
impl, and its autograd (setup_context, backward) in registration order, beside its host
launcher. ``torch.compile`` and ``torch.export`` trace through the fake impls.

    conv_bn_act                     eval: conv + BN (+ projection + BN) (+ residual) (+ ReLU)
    conv_train -> bn_stats -> bn_act_train     train: conv with BN statistics, their merge
                                    (running stats updated), BN-apply (+ shortcut) (+ ReLU)
    conv_dgrad, conv_wgrad, bn_bwd  the training ops' backward

Which path a module takes is decided in ``fastres.fused``; ``uses_triton`` (here, so tests can
patch it) says which tensors run on the kernels.
"""
from fastres.ops.common import (CL, SUPPORTED_DTYPES, autocasting, check_input,  # noqa: F401
                                uses_triton)
from fastres.ops import (bn_act_train, bn_bwd, bn_stats, conv_bn_act, conv_dgrad,  # noqa: F401
                         conv_train, conv_wgrad)
