"""The speed-ups of issue 17: reused probe runs in --sequential, row gathering for the
measured moments, synthetic samples drawn once, moments of the pruned producers only, progress
counters, --round-to auto, the input range measured only when read, Eq. 9 scales applied in the
weight's own layout."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest

from onnx_udfc import api, pipeline
from onnx_udfc.channels import absorbers
from onnx_udfc.channels.absorbers import Absorber, ColumnView
from onnx_udfc.channels.activations import activation_tensor
from onnx_udfc.channels.plan import make_plan
from onnx_udfc.channels.stats import LayerWeights, weight_layer
from onnx_udfc.config import CompressConfig, PruneOptions
from onnx_udfc.core.errors import UdfcError
from onnx_udfc.core.io import set_tensor_array, tensor_array
from onnx_udfc.core.ort import conv_channel_block
from onnx_udfc.methods import plus, sequential
from onnx_udfc.methods.compensate import MethodRun, compensate_pruning
from onnx_udfc.moments import input_range, measured
from onnx_udfc.moments.input_range import resolve_input_range
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.moments.sampled import synthetic_inputs
from onnx_udfc.moments.source import MomentSource
from tests.helpers import trained_for

STEM_RELU = "/stem/stem.2/Relu_output_0"
STEM5_RELU = "/stem/stem.5/Relu_output_0"
CONV3_RELU = "/conv3/conv3.2/Relu_output_0"


@pytest.fixture()
def digits(digits_model: Path) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = onnx.load(str(digits_model))
    return model, synthetic_inputs(model, seed=0)


def test_needed_part_holds_only_what_the_tensor_depends_on(digits) -> None:
    model, _ = digits
    part = sequential.needed_part(model, [STEM_RELU])
    assert [n.op_type for n in part.graph.node] == ["Conv", "BatchNormalization", "Relu"]
    assert {t.name for t in part.graph.initializer} == {
        "stem.0.weight", "stem.1.weight", "stem.1.bias", "stem.1.running_mean",
        "stem.1.running_var"}
    assert [o.name for o in part.graph.output] == [STEM_RELU]


def test_compressed_runs_reuse_tensors_until_a_weight_above_them_changes(digits, monkeypatch
                                                                        ) -> None:
    model, feed = digits
    given_seen: list[set[str]] = []
    real = sequential.run_tensors

    def spy(*args, **kwargs):
        given_seen.append(set(kwargs.get("given") or args[5] or {}))
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "run_tensors", spy)
    runs = sequential.CompressedRuns(model, feed, {}, {})
    runs([STEM_RELU])
    runs([STEM5_RELU])
    assert STEM_RELU in given_seen[-1]  # nothing changed: the stem's output is reused
    inits = {t.name: t for t in model.graph.initializer}
    w = inits["stem.0.weight"]
    set_tensor_array(w, tensor_array(w) * 0.5)  # above both cached tensors
    fresh_from_runs = runs([CONV3_RELU])
    assert given_seen[-1] == set()  # both went stale
    fresh = real(model, feed, [CONV3_RELU])
    assert np.array_equal(fresh_from_runs[CONV3_RELU], fresh[CONV3_RELU])
    last = runs([CONV3_RELU, STEM5_RELU])
    assert np.allclose(last[CONV3_RELU], fresh[CONV3_RELU], rtol=1e-5, atol=1e-5)


def test_rows_are_the_strided_positions_of_the_channels_last_view() -> None:
    rng = np.random.default_rng(0)
    for shape, dtype in [((3, 5, 70, 90), np.float32), ((2, 4, 7), np.float16),
                         ((40000, 6), np.float32), ((1, 3, 4, 4), np.float32)]:
        a = rng.standard_normal(shape).astype(dtype)
        old = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]).astype(np.float32, copy=False)
        old = old[::max(1, len(old) // measured.ROWS)]
        new = measured._rows(a)
        assert new.dtype == np.float32 and np.array_equal(new, old)


def test_synthetic_samples_are_drawn_once_per_input_signature(digits) -> None:
    model, _ = digits
    source = MomentSource(model, "sampled")
    first = source.sample_feed(model, 8)
    assert source.sample_feed(model, 8) is first
    other = onnx.ModelProto()
    other.CopyFrom(model)
    other.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 16
    assert source.sample_feed(other, 8) is not first


def test_no_pruning_reads_no_moments(digits) -> None:
    model, _ = digits
    analysis = api.analyse(model)

    class NoMoments(MomentSource):
        def moments(self, *args, **kwargs):  # pragma: no cover - must not be called
            raise AssertionError("moments read although nothing is pruned")

    removed = np.zeros(len(analysis.channels.roots()), dtype=bool)
    cfg = MethodRun(CompressConfig.resolve(method="udfc+").method)
    assert compensate_pruning(analysis.channels, removed, cfg,
                              source=NoMoments(model, "sampled")) == {}


def test_pruning_reads_the_moments_of_the_pruned_producers_only(digits) -> None:
    model, _ = digits
    analysis = api.analyse(model)
    ctx = analysis.channels
    plan = make_plan(ctx, analysis.groups, PruneOptions(ratio=0.3))
    asked: list[list[str]] = []

    class Spy(MomentSource):
        def moments(self, model, shapes, tensors, **kwargs):
            asked.append(list(tensors))
            return super().moments(model, shapes, tensors, **kwargs)

    cfg = MethodRun(CompressConfig.resolve(method="udfc+").method)
    out = compensate_pruning(ctx, plan.removed, cfg, source=Spy(model, "sampled"))
    root = ctx.roots()
    losing = [p for p in ctx.producers if plan.removed[root[p.slots]].any()]
    assert 0 < len(losing) < len(ctx.producers)
    assert asked == [[activation_tensor(p.node, ctx) for p in losing]]
    assert any(entry["compensated"] for entry in out.values())


def test_measured_moments_pool_batches_like_one_covariance(digits, monkeypatch) -> None:
    model, feed = digits
    whole = measured.measure(model, feed, [STEM_RELU, CONV3_RELU])
    monkeypatch.setattr(measured, "BATCH", 3)  # several batches: the shift is not the mean
    batched = measured.measure(model, feed, [STEM_RELU, CONV3_RELU])
    for name in (STEM_RELU, CONV3_RELU):
        rows = measured._rows(measured.session(
            measured.with_outputs(model, [name])).run([name], feed)[0]).astype(np.float64)
        assert np.allclose(whole[name].mean, rows.mean(0), rtol=1e-5, atol=1e-6)
        assert np.allclose(whole[name].cov, np.cov(rows.T, bias=True), rtol=1e-4, atol=1e-6)
        assert np.allclose(batched[name].cov, whole[name].cov, rtol=1e-4, atol=1e-6)


def test_mean_error_without_the_second_moment_products(digits) -> None:
    model, _ = digits
    ctx = api.analyse(model).channels
    layer = next(layer for p in ctx.producers
                 for layer in [weight_layer(p.node, ctx.inits)] if layer is not None)
    dims = [int(d) for d in ctx.inits[layer.weight].dims]
    rng = np.random.default_rng(0)
    f = layer.filters(ctx.inits).astype(np.float64)
    fq = f + 0.01 * rng.standard_normal(f.shape)
    c = dims[1]
    a = rng.standard_normal((c, 2 * c))
    m = TensorMoments(rng.standard_normal(c), a @ a.T / (2 * c))
    full = plus._patch_products(dims, layer, f, fq, m, 0.5)
    mean_only = plus._patch_products(dims, layer, f, fq, m, 0.5, cross=False)
    assert full is not None and mean_only is not None
    assert mean_only[:2] == (None, None) and np.array_equal(mean_only[2], full[2])


class Recorder:
    def __init__(self) -> None:
        self.details: list[str] = []

    def __call__(self, name: str) -> None:
        pass

    def detail(self, text: str) -> None:
        self.details.append(text)


def test_long_stages_count_their_layers(digits_model: Path) -> None:
    config = CompressConfig.resolve("best", prune=0.3)
    config.validate()
    progress = Recorder()
    _, report = pipeline.run(config, str(digits_model), progress)
    fits = [d for d in progress.details if d.startswith("fit layer")]
    quants = [d for d in progress.details if d.startswith("quantize")]
    assert fits[0] == f"fit layer 1/{len(fits)}" and fits[-1] == f"fit layer {len(fits)}/" \
        f"{len(fits)}"
    quantized = sum(1 for layer in report.layers if layer.get("quantization"))
    assert quants[-1] == f"quantize {quantized}/{quantized}"
    assert set(report.timings) >= {"compensate", "quantize"}


def test_round_to_auto_keeps_multiples_of_the_conv_block(digits_model: Path) -> None:
    block = conv_channel_block()
    assert block in (8, 16)
    model = onnx.load(str(digits_model))
    analysis = api.analyse(model)
    plan = make_plan(analysis.channels, analysis.groups, PruneOptions(ratio=0.3, round_to="auto"))
    explicit = make_plan(analysis.channels, analysis.groups,
                         PruneOptions(ratio=0.3, round_to=block))
    assert [g.kept for g in plan.groups] == [g.kept for g in explicit.groups]
    assert all(g.kept % block == 0 or g.kept == g.group.size for g in plan.groups
               if len(g.removed))


def test_round_to_accepts_auto_and_integers_only() -> None:
    CompressConfig.resolve(round_to="auto").validate()
    with pytest.raises(UdfcError, match="--round-to"):
        CompressConfig.resolve(round_to="fast").validate()


def test_a_run_that_draws_no_data_free_input_never_measures_the_input_range(monkeypatch
                                                                            ) -> None:
    def measured_anyway(*_args, **_kwargs):
        raise AssertionError("the input range was measured")

    monkeypatch.setattr(input_range, "_spreads", measured_anyway)
    _, report = api.compress(trained_for("0-255"), preset="fast", **{"check.verify": False})
    assert report.input_range == {"range": None, "from": input_range.NOT_MEASURED}
    assert "range " not in report.summary()


def test_the_input_range_read_later_is_measured_on_the_original_model() -> None:
    model = trained_for("0-255")
    eager = resolve_input_range(onnx.ModelProto.FromString(model.SerializeToString()), "auto")
    deferred = resolve_input_range(model, "auto")
    assert not deferred.resolved
    first = next(t for t in model.graph.initializer if t.name == "conv0.weight")
    set_tensor_array(first, tensor_array(first) * 255.0)  # pruning or rounding changes weights
    assert (deferred.name, deferred.origin) == (eager.name, eager.origin) == (
        "0-255", eager.origin)
    assert deferred.resolved
    # A run that draws data-free inputs (udfc+ samples) measures it, as before.
    _, report = api.compress(trained_for("0-255"), **{"check.verify": False})
    assert report.input_range == eager.to_dict()


@pytest.mark.parametrize(("op", "shape", "in_axis", "group", "positions"), [
    ("Conv", (8, 6, 3, 3), 1, 1, [[0], [2], [5]]),
    ("Conv", (8, 2, 3, 3), 1, 4, [[1], [4], [6]]),  # grouped: position 4 is group 2's first
    ("Gemm", (12, 5), 0, 1, [[0, 1], [6, 7], [10, 11]]),  # a Flatten block of 2 per channel
])
def test_eq9_scales_give_the_column_view_bits_in_the_weights_layout(monkeypatch, op, shape,
                                                                    in_axis, group,
                                                                    positions) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32)
    w.flat[0] = -0.0
    node = onnx.helper.make_node(op, ["x", "w"], ["y"], **({"group": group} if group > 1
                                                         else {}))
    absorber = Absorber(LayerWeights(node, "w", 1 - in_axis if op == "Gemm" else 0, in_axis),
                        "x")
    pos, scales = np.array(positions), rng.uniform(0.5, 2.0, len(positions))

    reference = SimpleNamespace(inits={"w": onnx.numpy_helper.from_array(w, "w")})
    view = ColumnView(reference, absorber)  # type: ignore[arg-type]
    view.cols[pos] *= scales[:, None, None]
    view.write()

    def column_view(*_args, **_kwargs):
        raise AssertionError("the whole weight went through a float64 column view")

    monkeypatch.setattr(absorbers, "ColumnView", column_view)
    ctx = SimpleNamespace(inits={"w": onnx.numpy_helper.from_array(w, "w")})
    absorbers._scale_inputs(ctx, absorber, pos, scales)  # type: ignore[arg-type]
    assert tensor_array(ctx.inits["w"]).tobytes() == tensor_array(reference.inits["w"]).tobytes()


def test_channel_classes_are_computed_once_until_slots_change(digits) -> None:
    model, _ = digits
    ctx = api.analyse(model).channels
    first = ctx.roots()
    assert ctx.roots() is first and not first.flags.writeable
    a, b = ctx.new_slots(1), ctx.new_slots(1)
    assert len(ctx.roots()) == len(first) + 2
    ctx.union(a, b)
    classes = ctx.roots()
    assert classes[b[0]] == classes[a[0]] == a[0]
    assert np.array_equal(classes[:len(first)], first)


# -- fast int8 (issue 17: at most 1.5x quantize_dynamic): the same bits with fewer passes ------

def _old_symmetric(w: np.ndarray, bits: int, axis: int | None, scale_dtype) -> tuple:
    """quantize_symmetric_params before: a float64 copy divided in place, clipped, and the
    int8 codes converted back to float64."""
    x = np.asarray(w).astype(np.float64)
    red = tuple(range(x.ndim)) if axis is None else tuple(range(1, x.ndim))
    qmax = 2 ** (bits - 1) - 1
    m = np.maximum(np.max(x, axis=red, initial=0.0), -np.min(x, axis=red, initial=0.0)) + 0.0
    scale = np.where(m > 0, m / qmax, 1.0)
    if scale_dtype is not None:
        rounded = np.asarray(scale).astype(scale_dtype).astype(np.float64)
        scale = np.where((rounded > 0) & np.isfinite(rounded), rounded, 1.0)
    sb = scale.reshape(()) if axis is None else scale.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    steps = np.divide(x, sb, out=x)
    q = np.clip(np.round(steps, out=steps), -qmax, qmax, out=steps).astype(np.int8)
    deq = q.astype(np.float64)
    deq *= sb
    out_dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.dtype(np.float64)
    return deq.astype(out_dtype, copy=False), q, np.asarray(scale)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_symmetric_grid_has_the_bits_of_the_int8_round_trip(dtype) -> None:
    from onnx_udfc.quant.grids import quantize_symmetric_params

    rng = np.random.default_rng(0)
    for trial in range(40):
        n, d = int(rng.integers(1, 40)), int(rng.integers(1, 300))
        w = (rng.standard_normal((n, d)) * rng.uniform(0.01, 3.0)).astype(dtype)
        w[rng.random((n, d)) < 0.05] = 0.0
        w[0] = 0.0 if trial % 4 == 0 else w[0]  # an all-zero channel: scale 1
        w[-1, :3] = -1e-9  # codes 0 rounded from below: -0.0 before the +0.0
        before = w.copy()
        for bits in (2, 4, 8):
            for axis in (None, 0):
                for scale_dtype in (None, np.float32):
                    new = quantize_symmetric_params(w, bits, axis, scale_dtype)
                    deq, q, scale = _old_symmetric(w, bits, axis, scale_dtype)
                    assert new.dequantized.dtype == deq.dtype
                    assert new.dequantized.tobytes() == deq.tobytes()
                    assert new.q.tobytes() == q.tobytes()
                    assert np.asarray(new.scale).tobytes() == scale.tobytes()
        assert w.tobytes() == before.tobytes()  # the caller's float64 filters are not copied


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("axis", [None, 0])
def test_symmetric_grid_refuses_a_non_finite_weight_from_its_range(bad, axis) -> None:
    from onnx_udfc.quant.grids import quantize_symmetric_params

    w = np.ones((3, 4))
    w[1, 2] = bad
    with pytest.raises(ValueError, match="must be finite"):
        quantize_symmetric_params(w, 8, axis)


@pytest.mark.parametrize("chunk", [1, 64, 1 << 15])
def test_eq14_scales_in_blocks_of_rows_equal_the_whole_matrix_products(monkeypatch, chunk
                                                                       ) -> None:
    from onnx_udfc.channels.stats import ChannelStats
    from onnx_udfc.methods import equations
    from onnx_udfc.quant.grids import quantize_symmetric_params

    monkeypatch.setattr(equations, "_EQ14_CHUNK", chunk)
    rng = np.random.default_rng(1)
    for n, d in [(1, 5), (7, 40), (33, 300), (64, 1100)]:
        f = rng.standard_normal((n, d))
        fq = quantize_symmetric_params(f, 4, 0, np.float32).dequantized
        gamma = rng.standard_normal(n)
        gamma[0] = 0.0  # a channel with no signal: denominator k2 only
        stats = ChannelStats(gamma, rng.standard_normal(n), rng.standard_normal(n),
                             rng.uniform(0.1, 2.0, n), 1e-5)
        r, rq = equations.folded_filters(f, stats), equations.folded_filters(fq, stats)
        k2 = 0.008 * equations.folded_bias(None, stats) ** 2
        num = np.einsum("nd,nd->n", rq, r) + k2
        den = np.einsum("nd,nd->n", rq, rq) + k2
        old = np.divide(num, den, out=np.ones_like(num), where=den > 0)
        assert equations.eq14_21_quantization_scale(f, fq, stats, 0.008).tobytes() == \
            old.tobytes()


def test_filter_norms_block_size_changes_no_bit() -> None:
    from onnx_udfc.channels.analysis import filter_norms

    rng = np.random.default_rng(2)
    for shape in [(5, 3, 3, 3), (300, 64, 3, 3), (40, 2000), (3, 70000)]:
        f = rng.standard_normal(shape).astype(np.float32)
        whole = filter_norms(f, chunk=1 << 30)
        for chunk in (1, 1000, 1 << 16):
            part = filter_norms(f, chunk=chunk)
            assert part[0].tobytes() == whole[0].tobytes()
            assert part[1].tobytes() == whole[1].tobytes()


def test_channel_positions_from_one_sort_equal_a_scan_per_class() -> None:
    from onnx_udfc.channels.absorbers import channel_positions
    from onnx_udfc.channels.analysis import TensorChannels

    def scan(roots: np.ndarray, classes: np.ndarray) -> np.ndarray | None:
        pos = [np.flatnonzero(roots == c) for c in classes.tolist()]
        if not pos or len({len(p) for p in pos}) != 1 or len(pos[0]) == 0:
            return None
        return np.stack(pos)

    rng = np.random.default_rng(3)
    for trial in range(500):
        if trial % 2:  # every class m times (a Flatten block), shuffled
            roots = np.repeat(rng.permutation(60)[:int(rng.integers(1, 20))],
                              int(rng.integers(1, 4)))
        else:  # uneven counts
            roots = rng.integers(0, 10, int(rng.integers(0, 30)))
        roots = rng.permutation(roots).astype(np.int64)
        classes = rng.choice(np.arange(64), int(rng.integers(0, 6)), replace=False)
        if trial % 3 == 0 and len(roots):  # classes that are there, repeated too
            classes = rng.choice(roots, int(rng.integers(1, 6)))
        ctx = SimpleNamespace(tensors={"x": TensorChannels(1, np.arange(len(roots)))},
                              roots=lambda r=roots: r)
        got, want = channel_positions(ctx, "x", classes), scan(roots, classes)  # type: ignore[arg-type]
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
def test_dequantize_without_zero_point_has_the_int32_bits(dtype) -> None:
    from onnx_udfc.quant.qdq import dequantize

    rng = np.random.default_rng(4)
    info = np.iinfo(dtype)
    q = rng.integers(info.min, info.max + 1, (6, 5, 3, 3)).astype(dtype)
    scale = rng.uniform(1e-4, 1.0, 6)
    for zp in (None, np.zeros(6, dtype=dtype)):
        got = dequantize(q, scale, zp, {"axis": 0})
        s = scale.astype(np.float32).reshape(-1, 1, 1, 1)
        want = (q.astype(np.int32) - 0).astype(np.float32) * s
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()


@pytest.mark.parametrize("preset", ["fast", "balanced"])
def test_quantize_reuses_the_stages_analysis_when_nothing_is_pruned(digits_model: Path,
                                                                    monkeypatch, preset) -> None:
    from onnx_udfc.methods import compensate

    model = onnx.load(str(digits_model))
    before = api.compress(model, preset=preset, **{"check.verify": False})
    analysed: list[bool] = []
    real = compensate.analyse

    def counted(*args, **kwargs):
        analysed.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(compensate, "analyse", counted)
    again = api.compress(model, preset=preset, **{"check.verify": False})
    assert not analysed  # the analyse stage's analysis served quantize
    pruned = api.compress(model, preset=preset, prune=0.3, **{"check.verify": False})
    assert analysed  # pruning changed the graph: quantize analysed it again
    assert pruned[1].params_after < pruned[1].params_before
    monkeypatch.undo()
    real_quantize = pipeline.quantize_model

    def own_analysis(*args, **kwargs):
        kwargs["analysis"] = None
        return real_quantize(*args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_model", own_analysis)
    fresh = api.compress(model, preset=preset, **{"check.verify": False})
    # the same model and report as with quantize's own analysis
    assert again[0].SerializeToString() == fresh[0].SerializeToString() == \
        before[0].SerializeToString()
    timeless = [{k: v for k, v in r.to_dict().items() if k != "timings"}
                for r in (again[1], fresh[1])]
    assert timeless[0] == timeless[1]


def test_quantize_model_refuses_an_analysis_of_another_model(digits_model: Path) -> None:
    from onnx_udfc.methods.compensate import MethodRun, quantize_model

    model = onnx.load(str(digits_model))
    other = api.analyse(onnx.load(str(digits_model))).channels
    cfg = MethodRun(CompressConfig.resolve("fast").method, CompressConfig.resolve("fast").quant)
    with pytest.raises(ValueError, match="another model"):
        quantize_model(model, cfg, analysis=other)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_eq9_scales_in_one_pass_have_the_float64_round_trip_bits(dtype) -> None:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 8, 3, 3)).astype(dtype)
    w.flat[:5] = -0.0
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"])
    absorber = Absorber(LayerWeights(node, "w", 0, 1), "x")
    pos, scales = np.array([[1], [4], [7]]), rng.uniform(0.5, 2.0, 3)
    ctx = SimpleNamespace(inits={"w": onnx.numpy_helper.from_array(w, "w")})
    absorbers._scale_inputs(ctx, absorber, pos, scales)  # type: ignore[arg-type]
    factor = np.ones(8)
    factor[pos[:, 0]] = scales
    want = w.astype(np.float64)
    want *= factor.reshape(1, -1, 1, 1)
    got = tensor_array(ctx.inits["w"])
    assert got.dtype == dtype and got.tobytes() == want.astype(dtype).tobytes()


def _old_greedy_removal(cov: np.ndarray, gram: np.ndarray, ridge: float) -> tuple:
    """The greedy steps of channels/select.py greedy_removal before its rows were updated in
    place (vstack and fancy-index copies every step)."""
    c = cov.shape[0]
    d = float(np.mean(np.diag(cov))) if c else 0.0
    lam = np.linalg.inv(cov + (ridge * d + 1e-12 * max(d, 1e-30)) * np.eye(c))
    lam = (lam + lam.T) / 2
    m = (gram + gram.T) / 2
    order, errors, free = [], [], np.ones(c, dtype=bool)
    b, u_all, v_all, total = np.zeros((0, 0)), np.zeros((0, c)), np.zeros((0, c)), 0.0
    for _ in range(c):
        p = np.asarray(order, dtype=np.int64)
        s = np.diag(lam) - np.einsum("pc,pc->c", lam[p], u_all)
        gain = (np.einsum("pc,pc->c", u_all, v_all) - 2 * np.einsum("pc,pc->c", m[p], u_all)
                + np.diag(m))
        inc = np.where(free & (s > 0), gain / np.where(s > 0, s, 1.0), np.inf)
        j = int(np.argmin(inc))
        if not np.isfinite(inc[j]):
            break
        u = u_all[:, j]
        r = (lam[j] - lam[j, p] @ u_all) / s[j]
        mu = m[np.ix_(p, p)] @ u if p.size else np.zeros(0)
        u_new = np.vstack([u_all - np.outer(u, r), r])
        v_top = v_all - np.outer(mu, r) + np.outer(m[p, j], r)
        v_new = np.vstack([v_top, m[j, p] @ (u_all - np.outer(u, r)) + m[j, j] * r])
        b_new = np.empty((p.size + 1, p.size + 1))
        b_new[:-1, :-1] = b + np.outer(u, u) / s[j]
        b_new[:-1, -1] = b_new[-1, :-1] = -u / s[j]
        b_new[-1, -1] = 1.0 / s[j]
        b, u_all, v_all = b_new, u_new, v_new
        total += max(float(inc[j]), 0.0)
        order.append(j)
        errors.append(total)
        free[j] = False
    # (the channels left after the greedy steps follow in an order the change did not touch)
    return np.asarray(order, dtype=np.int64), np.asarray(errors)


def test_greedy_removal_in_place_has_the_bits_of_the_copying_loop() -> None:
    """recon's greedy removal (the plan's cost on wide layers) updates its rows in place: the
    same order and errors, bit for bit, including a dead channel and a rank-deficient Gram."""
    from onnx_udfc.channels.select import RIDGE, greedy_removal

    rng = np.random.default_rng(4)
    for c in (1, 2, 3, 7, 40, 130):
        for trial in range(4):
            a = rng.standard_normal((c, 3 * c + 5))
            cov = a @ a.T / a.shape[1]
            g = rng.standard_normal((c, max(1, c // 2) if trial == 2 else 2 * c))
            gram = g @ g.T
            if trial == 1:
                cov[:, 0] = cov[0, :] = 0.0  # a channel that never fires
            new, old = greedy_removal(cov, gram), _old_greedy_removal(cov, gram, RIDGE)
            steps = len(old[0])
            assert steps and len(new[0]) == c
            assert new[0][:steps].tobytes() == old[0].tobytes()
            assert new[1][:steps].tobytes() == old[1].tobytes()
