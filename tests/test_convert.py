"""fastres.convert on torchvision models: same parameters, same keys, same outputs."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import fastres
from helpers import DEVICE, ConvCounter, assert_close, randomize_bn


def _tv(name, **kw):
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, name)(**kw)).eval()


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("resnet50", 32)])
def test_converted_network_matches_torchvision(name, size):
    ref = _tv(name)
    model = fastres.convert(copy.deepcopy(ref)).to(DEVICE)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        with ConvCounter() as counter:
            got = model(x.to(DEVICE))
        expect = ref(x)
    assert counter.convs == 0, "every conv of the converted network must run fused"
    assert_close(got.cpu(), expect, torch.float32, name)


def test_dilated_resnet():
    ref = _tv("resnet50", replace_stride_with_dilation=[False, True, True])
    model = fastres.convert(copy.deepcopy(ref))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert_close(model.to(DEVICE)(x.to(DEVICE)).cpu(), ref(x), torch.float32, "dilated")


def test_parameters_shared_and_state_dict_unchanged():
    model = _tv("resnet18")
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    params = {id(p) for p in model.parameters()}
    fastres.convert(model)
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert all(after[k] is before[k] for k in before), "convert must share, not copy"
    assert {id(p) for p in model.parameters()} == params
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d
    assert type(model.relu) is nn.ReLU, "the stem keeps torchvision's modules"
    assert isinstance(model, torchvision.models.ResNet)
    assert all(isinstance(b, torchvision.models.resnet.BasicBlock)
               and isinstance(b, fastres.FusedBlock)
               for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
               for b in layer)


def test_converted_model_pickles_and_deepcopies():
    model = fastres.convert(_tv("resnet18"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expect = model(x)
        for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert type(clone) is type(model)
            assert type(clone.layer1[0]) is type(model.layer1[0])
            assert_close(clone(x), expect, torch.float32, "clone")


def test_idempotent_and_torchvision_checkpoint_loads():
    ref = _tv("resnet18")
    model = fastres.convert(fastres.convert(copy.deepcopy(ref)))
    types = [type(m) for m in model.modules()]
    assert [type(m) for m in fastres.convert(model).modules()] == types
    model.load_state_dict(ref.state_dict())  # strict: every key, no extras


def test_unknown_blocks_are_left_alone_and_reported():
    class MyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    model = nn.Sequential(MyBlock(), nn.ReLU())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastres.convert(model)
    assert type(model[0]) is MyBlock and type(model[0].conv) is nn.Conv2d
    assert any("MyBlock" in str(w.message) for w in caught)


def test_data_parallel_wrapped_model():
    ref = _tv("resnet18")
    wrapped = fastres.convert(nn.DataParallel(copy.deepcopy(ref)))
    assert isinstance(wrapped.module.layer1[0], fastres.FusedBlock)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(wrapped.module(x), ref(x), torch.float32, "DataParallel")


def test_converted_stem_trains_like_torchvision():
    ref = _tv("resnet18").train()
    model = fastres.convert(copy.deepcopy(ref)).train()
    x = torch.randn(4, 3, 64, 64)  # 2x2 maps at layer4: BN over 16 values, not 2
    assert_close(model.to(DEVICE)(x.to(DEVICE)).cpu(), ref(x), torch.float32, "train mode")
    torch.testing.assert_close(model.bn1.running_mean.cpu(), ref.bn1.running_mean)
    assert int(model.bn1.num_batches_tracked) == 1
