"""Property-based: random chains of supported ops. Ratio 0 is the identity; any ratio (any
method, with or without quantization) gives a model that passes the full checker and runs."""

from __future__ import annotations

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_udfc import api
from tests.helpers import Builder, max_diff, random_feeds, run

BLOCKS = ("conv_bn_act", "residual", "concat", "depthwise", "pool", "split", "pad_channels")
ACTS = ("Relu", "LeakyRelu", "Sigmoid", "HardSwish", "Clip", "Tanh")


def _act(b: Builder, x: str, kind: str) -> str:
    if kind == "Clip":
        return b.op("Clip", [x, b.const(0.0), b.const(6.0)])
    return b.op(kind, [x])


@st.composite
def chains(draw):
    b = Builder(seed=draw(st.integers(0, 1000)))
    c = draw(st.sampled_from([3, 4, 6]))
    x = b.input("x", ["N", c, 8, 8])
    for _ in range(draw(st.integers(1, 5))):
        block = draw(st.sampled_from(BLOCKS))
        act = draw(st.sampled_from(ACTS))
        if block == "conv_bn_act":
            cout = draw(st.integers(2, 12))
            x, c = _act(b, b.bn(b.conv(x, c, cout, k=draw(st.sampled_from([1, 3]))), cout),
                        act), cout
        elif block == "residual":
            y = _act(b, b.bn(b.conv(x, c, c), c), act)
            x = b.op("Add", [b.bn(b.conv(y, c, c), c), x])
        elif block == "concat":
            c1, c2 = draw(st.integers(1, 6)), draw(st.integers(1, 6))
            x = b.op("Concat", [b.conv(x, c, c1), b.conv(x, c, c2)], axis=1)
            c = c1 + c2
        elif block == "depthwise":
            x = _act(b, b.conv(x, c, c, group=c), act)
        elif block == "pool":
            x = b.op(draw(st.sampled_from(["MaxPool", "AveragePool"])), [x], kernel_shape=[3, 3],
                     pads=[1, 1, 1, 1])
        elif block == "split" and c >= 2:
            first = draw(st.integers(1, c - 1))
            a, d = b.op("Split", [x, b.ints([first, c - first])], outputs=2, axis=1)
            x = b.op("Concat", [b.conv(a, first, 4), b.conv(d, c - first, 4)], axis=1)
            c = 8
        elif block == "pad_channels":
            p = draw(st.integers(1, 3))
            x = b.op("Pad", [x, b.ints([0, p, 0, 0, 0, p, 0, 0])], mode="constant")
            c += 2 * p
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    b.output(b.gemm(x, c, 5))
    return b.build()


SETTINGS = settings(max_examples=80, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(model=chains())
def test_ratio_zero_is_identity(model):
    out, _ = api.compress(model, prune=0.0, target="fake", method="prune")
    assert max_diff(model, out) < 1e-5


@SETTINGS
@given(model=chains(), ratio=st.floats(0.0, 0.95), coupled=st.booleans(),
       method=st.sampled_from(["prune", "nm", "udfc"]),
       bits=st.sampled_from([None, 4, 8]))
def test_any_ratio_gives_a_valid_running_model(model, ratio, coupled, method, bits):
    out, report = api.compress(model, prune=ratio, prune_coupled=coupled, method=method,
                               bits=bits, target="fake")
    onnx.checker.check_model(out, full_check=True)
    feeds = random_feeds(model)
    assert run(out, feeds)[0].shape == run(model, feeds)[0].shape
    assert report.params_after <= report.params_before
