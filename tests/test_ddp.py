"""fastres blocks under DistributedDataParallel with synchronized BatchNorm: 2 CPU processes
(gloo), each with half of a batch, must match one torchvision block on the whole batch."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision.models.resnet as tv

import fastres
from fastres.blocks import conv1x1
from helpers import DEVICE, REL_TOL, rel_err

WORLD = 2
TOL = REL_TOL[torch.float32]


def _models():
    torch.manual_seed(0)
    down = nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    ref = tv.BasicBlock(8, 16, 2, down)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    ours = fastres.BasicBlock(8, 16, 2, copy.deepcopy(down))
    ours.load_state_dict(ref.state_dict())
    return ref.double().train(), ours.train()


def _data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2 * WORLD, 8, 7, 7, generator=g),
             torch.randn(2 * WORLD, 16, 4, 4, generator=g)) for _ in range(2)]


def _check(what, got, expect):
    err = rel_err(got, expect)
    assert err <= TOL, f"{what}: relative error {err:.3g} > {TOL:.1g}"


def _worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        ref, ours = _models()
        ddp = nn.parallel.DistributedDataParallel(fastres.sync_batchnorm(ours))
        mine = slice(2 * rank, 2 * rank + 2)
        for step, (x, grad) in enumerate(_data()):
            x_ref = x.double().requires_grad_()
            y_ref = ref(x_ref)
            y_ref.backward(grad.double())
            x_ours = x[mine].clone().requires_grad_()
            y = ddp(x_ours)
            y.backward(grad[mine])
            _check(f"rank {rank} step {step} output", y, y_ref[mine])
            _check(f"rank {rank} step {step} input grad", x_ours.grad, x_ref.grad[mine])
            for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
                # DDP averages the ranks' gradients of their local sums: full-batch / WORLD
                _check(f"rank {rank} step {step} {name}.grad", p.grad, q.grad / WORLD)
            for (name, b), c in zip(ours.named_buffers(), ref.buffers()):
                _check(f"rank {rank} step {step} {name}", b.double(), c.double())
            ref.zero_grad()
            ours.zero_grad()
    finally:
        dist.destroy_process_group()


def test_sync_batchnorm_refuses_the_unsynchronized_path(monkeypatch):
    _, ours = _models()
    fastres.sync_batchnorm(ours, process_group=object())
    monkeypatch.setattr(fastres.ops, "uses_triton", lambda t: False)
    with pytest.raises(NotImplementedError, match="synchronized BatchNorm"):
        ours(torch.randn(2, 8, 7, 7))
    ours.eval()(torch.randn(2, 8, 7, 7))  # running statistics: nothing to synchronize


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(DEVICE != "cpu", reason="2 gloo processes run the kernels through the "
                    "interpreter on CPU tensors; on a GPU machine CPU tensors take the plain path")
def test_sync_batchnorm_ddp_matches_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
