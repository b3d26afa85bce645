"""Model factories: torchvision-compatible ImageNet ResNets and the paper's CIFAR ResNets."""
import pytest
import torch
import torchvision

import fastres
from fastres.models import CIFAR_MODELS, IMAGENET_MODELS
from helpers import DEVICE, assert_close, randomize_bn

# He et al. 2015, Table 6: parameters of the CIFAR-10 ResNets, in millions.
PAPER_PARAMS_M = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_loads_torchvision_state_dict_and_inits_alike(name):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)(zero_init_residual=True)
    torch.manual_seed(0)
    ours = getattr(fastres.models, name)(zero_init_residual=True)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    for k in ref_sd:  # same constructor order and init: identical tensors
        torch.testing.assert_close(our_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    ours.load_state_dict(ref_sd)


@pytest.mark.parametrize("depth", sorted(PAPER_PARAMS_M))
def test_cifar_parameter_counts_match_the_paper(depth):
    model = getattr(fastres.models, f"cifar_resnet{depth}")()
    n = sum(p.numel() for p in model.parameters())
    weighted = sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert weighted == depth, "6n+2 weighted layers"
    paper = PAPER_PARAMS_M[depth]
    assert abs(n / 1e6 - paper) <= 0.05 * paper, f"{n / 1e6:.3f}M vs the paper's {paper}M"


def test_cifar_resnet_fused_matches_its_unfused_self(monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(fastres.models.cifar_resnet20()).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = model.to(DEVICE)(x.to(DEVICE))
        ref = model.cpu().double()(x.double())  # float64: op by op
    assert got.shape == (3, 10)
    assert_close(got.cpu(), ref, torch.float32, "cifar_resnet20")


def test_cifar_option_a_shortcut_shapes():
    model = fastres.models.cifar_resnet20()
    assert CIFAR_MODELS[0] == "cifar_resnet20"
    down = model.layer2[0].downsample
    assert isinstance(down, fastres.PadShortcut) and (down.stride, down.pad) == (2, 8)
    assert sum(p.numel() for p in down.parameters()) == 0
    y = down(torch.randn(2, 16, 32, 32))
    assert y.shape == (2, 32, 16, 16) and y[:, :8].abs().sum() == 0
