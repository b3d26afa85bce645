"""pytest plugin of the benchmarks: options, one parametrized case per row, a progress line
per row, and results.json + table.md + plot.png at the end of the session.

The Triton interpreter is never timed: on a GPU machine TRITON_INTERPRET is removed here,
before triton is imported; on a CPU every row runs without it (``benchmarks.harness.cpu_paths``)
so the fastres rows time its plain-PyTorch folded path. fastres (and with it triton) is
imported only once collection starts, after every conftest of the session ran: in
``pytest tests benchmarks`` the tests still get their interpreted kernels.
"""
import json
import os
import re
import statistics

import pytest
import torch

from benchmarks import report
from benchmarks.timing import device_name

if torch.cuda.is_available():
    os.environ.pop("TRITON_INTERPRET", None)

try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # a machine without it (no package index): same rows, no pytest table
    class _PlainBenchmark:
        def __init__(self) -> None:
            self.extra_info, self.group, self._timer = {}, None, None

        def pedantic(self, target, rounds=1, **kwargs) -> None:
            for _ in range(rounds):
                target()

    @pytest.fixture
    def benchmark():
        return _PlainBenchmark()

HARNESS = pytest.StashKey()
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def pytest_addoption(parser):
    g = parser.getgroup("fastres benchmarks (each also read from FASTRES_BENCH_<NAME>)")
    g.addoption("--quick", action="store_true", default=False,
                help="a few small units, one batch size: well under a minute on a CPU")
    g.addoption("--units", help="comma list of groups (convs, r18convs, blocks, networks) "
                                "or unit names (resnet50.layer3.0, cifar_resnet56, ...)")
    g.addoption("--providers", help="comma list of eager, eager_channels_last, compile, "
                                    "compile_max_autotune, fastres")
    g.addoption("--modes", help="comma list of inference, train")
    g.addoption("--dtypes", help="comma list of bf16, fp16, fp32")
    g.addoption("--batches", help="comma list of batch sizes (default by unit kind)")
    g.addoption("--rounds", help="timing samples per row (default 25 on a GPU, 5 on a CPU)")
    g.addoption("--bench-deadline", help="skip rows that would start after this many seconds")
    g.addoption("--bench-out", help="folder for results.json, table.md, plot.png "
                                    "(default benchmarks/results/<device>)")


def harness(config):
    """The session's ``benchmarks.harness.Harness``."""
    if HARNESS not in config.stash:
        from benchmarks.harness import Harness, Settings
        config.stash[HARNESS] = Harness(Settings.from_config(config))
    return config.stash[HARNESS]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        h = harness(metafunc.config)
        cases = h.settings.cases()
        prefix = "" if h.settings.on_gpu else "cpu-"
        metafunc.parametrize("case", cases, ids=[prefix + c.id for c in cases])


COMPILE_RANK = {"compile": 1, "compile_max_autotune": 2}


def pytest_collection_modifyitems(config, items):
    """Rows that compile run after all the others, max-autotune last, so a deadline
    (``--bench-deadline``) cuts the slowest-to-build rows first."""
    def rank(item):
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        return COMPILE_RANK.get(case.provider, 0) if case else 0
    items.sort(key=rank)
    harness(config).total = len(items)


@pytest.fixture(scope="session")
def bench_harness(request):
    return harness(request.config)


def out_dir(config) -> str:
    h = harness(config)
    chosen = config.getoption("--bench-out", default=None) or os.environ.get("FASTRES_BENCH_OUT")
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(h.dev).lower()).strip("-")
    return chosen or os.path.join(RESULTS, slug)


def _result(row: dict, samples) -> dict:
    return {"name": row["unit"], "extra_info": row,
            "stats": {"median": statistics.median(samples), "mean": statistics.mean(samples),
                      "min": min(samples), "max": max(samples), "rounds": len(samples)}}


def pytest_sessionfinish(session):
    h = harness(session.config)
    if not h.samples:
        return
    out = out_dir(session.config)
    os.makedirs(out, exist_ok=True)
    import triton
    data = {"machine_info": {"device": device_name(h.dev), "torch": torch.__version__,
                             "triton": triton.__version__},
            "benchmarks": [_result(row, h.samples[id(row)]) for row in h.rows()]}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(data, f, indent=1)
    h.outputs = report.write(h.rows(), out)


def pytest_terminal_summary(terminalreporter):
    h = harness(terminalreporter.config)
    outputs = h.outputs
    if outputs:
        terminalreporter.write_sep("=", "fastres: FLOPs vs wall-clock")
        with open(outputs[0]) as f:
            terminalreporter.write(f.read())
        data = os.path.join(os.path.dirname(outputs[0]), "results.json")
        terminalreporter.write_line(f"table: {outputs[0]}  plot: {outputs[1]}  data: {data}")
