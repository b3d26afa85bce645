"""The host path stays thin: Python function calls (cProfile) of an eval forward with every
kernel launch stubbed out, against eager torchvision's, in a process without the Triton
interpreter (the GPU's host path: real configs, no interpreted kernels).

Ceilings: a ResNet-50 forward at most twice eager's calls; at most 25 calls into fastres
(``fastres/`` and ``kernels/``) per fused launch, for the network and for one Bottleneck.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_OVER_EAGER = 2.0
MAX_PROJECT_CALLS_PER_LAUNCH = 25

SCRIPT = textwrap.dedent("""
    import cProfile, copy, json, os, pstats
    import torch, torchvision
    import fastres
    import fastres.kernels.conv as kconv

    launches = []

    class Stub:  # the launch itself: grid and arguments are made, nothing runs
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(grid)

    kconv.conv_fused_kernel = Stub()
    kconv.pad_nhwc_kernel = Stub()  # the stem's input and weight padded to 4 channels
    fastres.ops.uses_triton = lambda t: True  # CPU tensors on the GPU's host path
    roots = [os.path.join(os.path.realpath(p), "") for p in fastres.__path__]
    roots.append(os.path.join(os.path.dirname(os.path.realpath(kconv.__file__)), ""))

    def count(model, x):
        with torch.no_grad():
            model(x)
            launches.clear()
            profile = cProfile.Profile()
            profile.enable()
            model(x)
            profile.disable()
        stats = pstats.Stats(profile).stats
        total = sum(v[1] for v in stats.values())
        project = sum(v[1] for k, v in stats.items()
                      if any(os.path.realpath(k[0]).startswith(r) for r in roots))
        return dict(total=total, project=project, launches=len(launches))

    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64, 64)
    fast = fastres.convert(copy.deepcopy(ref)).to(memory_format=torch.channels_last)
    block = fastres.convert(copy.deepcopy(ref.layer2[0]))
    out = dict(eager=count(ref, x), fastres=count(fast, x),
               block=count(block, torch.randn(1, 256, 16, 16)))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def calls():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resnet50_forward_calls_at_most_twice_eager(calls):
    eager, fast = calls["eager"]["total"], calls["fastres"]["total"]
    # the stem + 3 a block (shortcuts fused) + the stem's input and weight padded to 4 channels
    assert calls["fastres"]["launches"] == 51, calls
    assert fast <= MAX_OVER_EAGER * eager, f"{fast} calls against eager's {eager}"


@pytest.mark.parametrize("what", ["fastres", "block"])
def test_project_calls_per_fused_launch(calls, what):
    c = calls[what]
    assert c["launches"] > 0, c
    per_launch = c["project"] / c["launches"]
    assert per_launch <= MAX_PROJECT_CALLS_PER_LAUNCH, \
        f"{what}: {per_launch:.1f} fastres calls per launch ({c})"
