"""Random small ONNX graphs written the way real exporters write them: the one generator of
``tools/fuzz.py`` and ``tests/test_fuzz.py`` (independent of the test helpers).

A graph is a stem, a few blocks and a head from the patterns of the coverage zoo (ResNet,
MobileNet v2/v3, EfficientNet, DenseNet, ShuffleNet, VGG, U-Net) and of the third-party
models in ``../shared/models/thirdparty`` (YOLO Focus stem, C2f and SiLU; MobileNet v3
HardSwish with a Shape-computed Reshape head). It may also be float16, have a dynamic batch
and/or image size, hard-code its batch in Reshapes, share a Conv weight, hold an If or a Loop,
read integer weights through DequantizeLinear, quantize its input, or list its weights among
its inputs. Images are 8x8 to 16x16 with at most 32 channels (a fraction of a second each).
``draw(rng)`` returns a :class:`Case`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ACTIVATIONS = ("relu", "relu6", "silu", "hardswish", "hardsigmoid_mul", "hardswish_decomposed")
BLOCKS = ("conv_bn_act", "inverted_residual", "basic_residual", "c2f", "dense_concat",
          "upsample_skip", "channel_shuffle", "shared_weight", "if_branch", "loop", "downsample")
HEADS = ("gap_flatten_gemm", "gap_reshape_batch1", "gap_reshape_shape_ops", "flatten_spatial_gemm",
         "detect_reshape", "conv_output")
MAX_CHANNELS = 32


@dataclass
class Case:
    model: onnx.ModelProto
    run_shape: list[int]          # the input shape the graph runs at (dynamic dims filled in)
    dynamic: bool                 # the declared input has symbolic dims
    patterns: list[str] = field(default_factory=list)

    @property
    def input_name(self) -> str:
        return self.model.graph.input[0].name


class Graph:
    """Nodes and initializers in the model's float type; names are generated."""

    def __init__(self, rng: np.random.Generator, opset: int, dtype: int) -> None:
        self.rng, self.opset, self.dtype = rng, opset, dtype
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, np.ndarray] = {}
        self.images: list[str] = []  # control-flow outputs, declared as image batches
        self._count = 0

    def fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def array(self, value, prefix: str = "const") -> str:
        name = self.fresh(prefix)
        self.inits[name] = np.asarray(value)
        return name

    def floats(self, value, prefix: str = "const") -> str:
        return self.array(np.asarray(value, dtype=self.np_dtype), prefix)

    def ints(self, value) -> str:
        return self.array(np.asarray(value, dtype=np.int64), "shape")

    def weight(self, shape: list[int], fan_in: int) -> np.ndarray:
        return (self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    def node(self, op: str, inputs: list[str], outputs: int = 1, **attrs) -> str | list[str]:
        name = self.fresh(op.lower())
        outs = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs


class Generator:
    """Draws one graph: model-wide features first, then stem, blocks and head."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, r = rng, rng.random
        opset = int(rng.choice([11, 13, 14, 17, 18]))
        self.float16 = r() < 0.15
        self.g = Graph(rng, opset, TensorProto.FLOAT16 if self.float16 else TensorProto.FLOAT)
        self.folded_bn = r() < 0.3                      # Conv with bias instead of Conv+BN
        self.qdq_weights = opset >= 13 and r() < 0.15
        self.act_default = str(rng.choice(ACTIVATIONS))
        self.batch_mode = str(rng.choice(["static1", "static2", "dynamic", "dynamic_baked1"]))
        self.dynamic_spatial = r() < 0.25
        self.hw = int(rng.choice([8, 12, 16]))
        self.batch = 2 if self.batch_mode in ("static2", "dynamic") else 1
        flags = {"float16": self.float16, "folded_bn": self.folded_bn,
                 "qdq_weights": self.qdq_weights, "dynamic_spatial": self.dynamic_spatial}
        self.patterns = {name for name, on in flags.items() if on} | {
            f"batch_{self.batch_mode}", f"opset_{opset}"}

    # -- pieces ----------------------------------------------------------------------------------
    def baked_batch(self) -> int:
        """The batch an exporter writes into a Reshape: the traced one, -1 when dynamic."""
        if self.batch_mode == "dynamic":
            return -1
        self.patterns.add("reshape_batch1" if self.batch_mode == "dynamic_baked1"
                          else "reshape_static_batch")
        return self.batch

    def baked_side(self) -> int:
        """The traced height and width an exporter writes into a Reshape or a classifier."""
        if self.dynamic_spatial:
            self.patterns.add("baked_spatial")
        return self.hw

    def act(self, x: str, kind: str | None = None) -> str:
        g, kind = self.g, kind or self.act_default
        self.patterns.add(f"act_{kind}")
        if kind == "relu":
            return g.node("Relu", [x])
        if kind == "relu6":
            return g.node("Clip", [x, g.floats(0.0), g.floats(6.0)])
        if kind == "silu":
            return g.node("Mul", [x, g.node("Sigmoid", [x])])
        if kind == "hardswish" and g.opset >= 14:
            return g.node("HardSwish", [x])
        if kind == "hardsigmoid_mul":
            return g.node("Mul", [x, g.node("HardSigmoid", [x], alpha=1 / 6, beta=0.5)])
        shifted = g.node("Clip", [g.node("Add", [x, g.floats(3.0)]), g.floats(0.0),
                                  g.floats(6.0)])
        return g.node("Div", [g.node("Mul", [x, shifted]), g.floats(6.0)])

    def weight_input(self, w: np.ndarray) -> str:
        """A weight initializer, or integers read through DequantizeLinear."""
        g = self.g
        if not (self.qdq_weights and self.rng.random() < 0.6):
            return g.floats(w, "w")
        scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / 127 + 1e-8).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127)
        out = g.node("DequantizeLinear", [g.array(q.astype(np.int8), "wq"),
                                          g.array(scale, "scale"),
                                          g.array(np.zeros(len(w), np.int8), "zp")], axis=0)
        return g.node("Cast", [out], to=g.dtype) if self.float16 else out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = False, weight: str | None = None) -> str:
        g = self.g
        w = weight or self.weight_input(g.weight([cout, cin // group, k, k], cin // group * k * k))
        ins = [x, w] + ([g.floats(0.1 * self.rng.standard_normal(cout), "b")] if bias else [])
        return g.node("Conv", ins, kernel_shape=[k, k], pads=[k // 2] * 4,
                      strides=[stride, stride], group=group)

    def bn(self, x: str, c: int) -> str:
        g, rng = self.g, self.rng
        stats = [rng.uniform(0.5, 1.5, c), 0.2 * rng.standard_normal(c),
                 0.2 * rng.standard_normal(c), rng.uniform(0.5, 1.5, c)]
        return g.node("BatchNormalization", [x, *[g.floats(s, "bn") for s in stats]],
                      epsilon=1e-5)

    def cba(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
            act: str | None = "default") -> str:
        """Conv -> BatchNorm -> activation, or Conv with bias when BN was folded on export."""
        self.patterns.add("conv_bn_act")
        if self.folded_bn:
            y = self.conv(x, cin, cout, k, stride, group, bias=True)
        else:
            y = self.bn(self.conv(x, cin, cout, k, stride, group), cout)
        return y if act is None else self.act(y, None if act == "default" else act)

    def channels(self, low: int = 2, high: int = 16) -> int:
        return int(self.rng.integers(low, high + 1))

    def split(self, x: str, sizes: list[int]) -> list[str]:
        g = self.g
        if g.opset < 13:
            return g.node("Split", [x], outputs=len(sizes), axis=1, split=sizes)
        if g.opset >= 18 and len(set(sizes)) == 1 and self.rng.random() < 0.5:
            return g.node("Split", [x], outputs=len(sizes), axis=1, num_outputs=len(sizes))
        return g.node("Split", [x, g.ints(sizes)], outputs=len(sizes), axis=1)

    def squeeze_excite(self, x: str, c: int) -> str:
        self.patterns.add("squeeze_excite")
        g, r = self.g, max(2, c // 4)
        s = g.node("GlobalAveragePool", [x])
        s = self.act(self.conv(s, c, r, k=1, bias=True), "relu")
        s = self.conv(s, r, c, k=1, bias=True)
        gate = g.node("HardSigmoid", [s], alpha=1 / 6, beta=0.5) if self.rng.random() < 0.4 \
            else g.node("Sigmoid", [s])
        return g.node("Mul", [x, gate])

    # -- stems and blocks ------------------------------------------------------------------------
    def stem(self, x: str) -> tuple[str, int]:
        cout = self.channels(4, 16)
        if self.hw % 2 == 0 and self.rng.random() < 0.2:
            self.patterns.add("focus_stem")  # YOLOv5: four strided Slices of the image
            g, parts = self.g, []
            for dy, dx in [(0, 0), (1, 0), (0, 1), (1, 1)]:
                parts.append(g.node("Slice", [x, g.ints([dy, dx]), g.ints([2**31, 2**31]),
                                              g.ints([2, 3]), g.ints([2, 2])]))
            self.hw //= 2
            return self.cba(g.node("Concat", parts, axis=1), 12, cout), cout
        return self.cba(x, 3, cout), cout

    def block(self, kind: str, x: str, c: int) -> tuple[str, int]:
        g, rng = self.g, self.rng
        if kind == "conv_bn_act":
            cout = self.channels()
            return self.cba(x, c, cout, k=int(rng.choice([1, 3]))), cout
        if kind == "downsample" and self.hw >= 8 and self.hw % 2 == 0:
            self.hw //= 2
            if rng.random() < 0.5:
                self.patterns.add("maxpool")
                return g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), c
            cout = self.channels()
            return self.cba(x, c, cout, stride=2), cout
        if kind == "inverted_residual":  # MobileNet v2/v3, EfficientNet MBConv
            self.patterns.add("depthwise")
            mid = min(MAX_CHANNELS, c * int(rng.choice([1, 2, 4])))
            y = self.cba(x, c, mid, k=1) if mid != c else x
            y = self.cba(y, mid, mid, group=mid)
            if rng.random() < 0.5:
                y = self.squeeze_excite(y, mid)
            cout = c if rng.random() < 0.6 else self.channels()
            y = self.cba(y, mid, cout, k=1, act=None)
            if cout == c:
                self.patterns.add("residual_add")
                y = g.node("Add", [y, x])
            return y, cout
        if kind == "basic_residual":  # ResNet basic block
            self.patterns.add("residual_add")
            y = self.cba(self.cba(x, c, c), c, c, act=None)
            return self.act(g.node("Add", [y, x])), c
        if kind == "c2f" and c >= 4:  # YOLOv8: Split halves, bottlenecks, Concat all
            self.patterns.add("c2f")
            half = max(2, c // 2)
            parts = self.split(self.cba(x, c, 2 * half, k=1), [half, half])
            for _ in range(int(rng.integers(1, 3))):
                y = self.cba(self.cba(parts[-1], half, half), half, half)
                parts.append(g.node("Add", [parts[-1], y]) if rng.random() < 0.5 else y)
            cout = self.channels()
            return self.cba(g.node("Concat", parts, axis=1), half * len(parts), cout, k=1), cout
        if kind == "dense_concat" and c <= MAX_CHANNELS - 8:  # DenseNet
            self.patterns.add("dense_concat")
            grow = self.channels(2, 8)
            return g.node("Concat", [x, self.cba(x, c, grow)], axis=1), c + grow
        if kind == "upsample_skip" and self.hw % 2 == 0 and c <= MAX_CHANNELS - 8:  # U-Net, FPN
            self.patterns.add("upsample_skip")
            small = self.cba(g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), c, 4)
            if rng.random() < 0.5:  # opset 11 Resize needs an roi input, later ones take ""
                roi = "" if g.opset >= 13 else g.array(np.zeros(0, np.float32), "roi")
                up = g.node("Resize", [small, roi, g.array(np.array([1, 1, 2, 2], np.float32),
                                                           "scales")], mode="nearest")
            else:
                self.patterns.add("conv_transpose")
                w = g.floats(g.weight([4, 4, 2, 2], 16), "w")
                up = g.node("ConvTranspose", [small, w], kernel_shape=[2, 2], strides=[2, 2])
            return g.node("Concat", [x, up], axis=1), c + 4
        if kind == "channel_shuffle" and c % 2 == 0 and c >= 4:  # ShuffleNet v2
            self.patterns.add("channel_shuffle")
            n, hw = self.baked_batch(), self.baked_side()
            y = g.node("Reshape", [x, g.ints([n, 2, c // 2, hw, hw])])
            y = g.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
            y = g.node("Reshape", [y, g.ints([n, c, hw, hw])])
            a, b = self.split(y, [c // 2, c // 2])
            return g.node("Concat", [a, self.cba(b, c // 2, c // 2)], axis=1), c
        if kind == "shared_weight":  # one Conv weight read twice
            self.patterns.add("shared_weight")
            w = g.floats(g.weight([c, c, 3, 3], 9 * c), "w")
            return self.act(self.conv(self.act(self.conv(x, c, c, weight=w)), c, c, weight=w)), c
        if kind in ("if_branch", "loop"):
            return (self.if_branch if kind == "if_branch" else self.loop)(x), c
        return self.block("conv_bn_act", x, c)

    def value(self, name: str, shape: list | None = None) -> onnx.ValueInfoProto:
        """A value in the model's float type; by default an image batch of unknown size."""
        return helper.make_tensor_value_info(name, self.g.dtype, shape or [None] * 4)

    def if_branch(self, x: str) -> str:
        """Exporter-style If on a shape test (always true) or a constant condition; the branches
        read ``x`` from the outer graph."""
        self.patterns.add("if_branch")
        g = self.g
        if self.rng.random() < 0.5:
            dim = g.node("Gather", [g.node("Shape", [x]), g.array(np.array(1, np.int64))])
            cond = g.node("Greater", [dim, g.array(np.array(0, np.int64))])
        else:
            cond = g.array(np.array(True), "cond")
        then_out, else_out = g.fresh("then"), g.fresh("else")
        then = helper.make_graph([helper.make_node("Relu", [x], [then_out])], "then", [],
                                 [self.value(then_out)])
        other = helper.make_graph([helper.make_node("Sigmoid", [x], [else_out])], "else", [],
                                  [self.value(else_out)])
        g.images.append(g.node("If", [cond], then_branch=then, else_branch=other))
        return g.images[-1]

    def loop(self, x: str) -> str:
        """A Loop of two iterations scaling the carried tensor, as in unrolled recurrences."""
        self.patterns.add("loop")
        g = self.g
        half = g.floats(0.5)
        i, cond_in, cond_out, v_in, scaled, v_out = (g.fresh(n) for n in (
            "i", "cond_in", "cond_out", "v_in", "scaled", "v_out"))
        body = helper.make_graph(
            [helper.make_node("Identity", [cond_in], [cond_out]),
             helper.make_node("Mul", [v_in, half], [scaled]),
             helper.make_node("Add", [scaled, v_in], [v_out])], "body",
            [helper.make_tensor_value_info(i, TensorProto.INT64, []),
             helper.make_tensor_value_info(cond_in, TensorProto.BOOL, []), self.value(v_in)],
            [helper.make_tensor_value_info(cond_out, TensorProto.BOOL, []), self.value(v_out)])
        g.images.append(g.node("Loop", [g.array(np.array(2, np.int64), "trips"),
                                        g.array(np.array(True), "cond"), x], body=body))
        return g.images[-1]

    # -- heads -----------------------------------------------------------------------------------
    def head(self, kind: str, x: str, c: int) -> list[str]:
        g, classes = self.g, self.channels(2, 10)
        self.patterns.add(f"head_{kind}")
        if kind == "conv_output":
            return [self.conv(x, c, classes, k=1, bias=True)]
        if kind == "detect_reshape":  # YOLO-style: Conv -> Reshape(anchors) -> Transpose
            y = self.conv(x, c, 2 * classes, k=1, bias=True)
            y = g.node("Reshape", [y, g.ints([self.baked_batch(), 2, classes,
                                              self.baked_side() ** 2])])
            return [g.node("Transpose", [y], perm=[0, 1, 3, 2])]
        if kind == "flatten_spatial_gemm":  # VGG: Flatten of C x H x W into the classifier
            flat, k = g.node("Flatten", [x], axis=1), c * self.baked_side() ** 2
        else:
            pooled = g.node("GlobalAveragePool", [x])
            k = c
            if kind == "gap_reshape_batch1":
                flat = g.node("Reshape", [pooled, g.ints([self.baked_batch(), c])])
            elif kind == "gap_reshape_shape_ops":  # dynamic batch read back with Shape ops
                n = g.node("Gather", [g.node("Shape", [pooled]), g.array(np.array(0, np.int64))])
                n = g.node("Unsqueeze", [n], axes=[0]) if g.opset < 13 \
                    else g.node("Unsqueeze", [n, g.ints([0])])
                flat = g.node("Reshape", [pooled, g.node("Concat", [n, g.ints([-1])], axis=0)])
            else:
                flat = g.node("Flatten", [pooled], axis=1)
        if self.rng.random() < 0.5:
            w = self.weight_input(g.weight([classes, k], k))
            y = g.node("Gemm", [flat, w, g.floats(0.1 * self.rng.standard_normal(classes), "b")],
                       transB=1)
        else:  # MatMul + Add, as the dynamo exporter and paddle2onnx write a Linear
            self.patterns.add("matmul_add")
            y = g.node("MatMul", [flat, g.floats(g.weight([k, classes], k), "w")])
            y = g.node("Add", [y, g.floats(0.1 * self.rng.standard_normal(classes), "b")])
        return [g.node("Softmax", [y], axis=1) if self.rng.random() < 0.3 else y]

    # -- the whole graph -------------------------------------------------------------------------
    def draw(self) -> Case:
        rng, g = self.rng, self.g
        batch = "N" if self.batch_mode.startswith("dynamic") else self.batch
        declared = [batch, 3, *(["H", "W"] if self.dynamic_spatial else [self.hw] * 2)]
        run_shape = [self.batch, 3, self.hw, self.hw]
        x = "images"
        if not self.float16 and rng.random() < 0.1:
            self.patterns.add("qdq_input")
            scale, zp = g.array(np.float32(0.05), "scale"), g.array(np.uint8(128), "zp")
            x = g.node("DequantizeLinear", [g.node("QuantizeLinear", [x, scale, zp]), scale, zp])
        x, c = self.stem(x)
        extra: list[str] = []
        for _ in range(int(rng.integers(1, 5))):
            x, c = self.block(str(rng.choice(BLOCKS)), x, c)
            if rng.random() < 0.1:
                extra.append(x)  # a feature map as a second output, as detectors have
        head = str(rng.choice(HEADS))
        if head == "flatten_spatial_gemm" and c * self.hw ** 2 > 2048:
            head = "gap_flatten_gemm"
        outputs = self.head(head, x, c) + extra[:1]
        if extra:
            self.patterns.add("two_outputs")
        return Case(self.model(declared, outputs, rng.random() < 0.1), run_shape,
                    batch == "N" or self.dynamic_spatial, sorted(self.patterns))

    def model(self, declared: list, outputs: list[str], weights_as_inputs: bool
              ) -> onnx.ModelProto:
        g = self.g
        inits = [numpy_helper.from_array(a, n) for n, a in g.inits.items()]
        inputs = [self.value("images", declared)]
        if weights_as_inputs:  # old exporters list initializers among the inputs
            self.patterns.add("weights_as_inputs")
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in inits]
        graph = helper.make_graph(g.nodes, "fuzz", inputs,
                                  [helper.make_empty_tensor_value_info(o) for o in outputs],
                                  inits, value_info=[self.value(n) for n in g.images])
        opsets = [helper.make_opsetid("", g.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="udfc-fuzz",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        inferred = onnx.shape_inference.infer_shapes(model)
        for out, typed in zip(model.graph.output, inferred.graph.output, strict=True):
            out.type.CopyFrom(typed.type)
            if not typed.type.tensor_type.HasField("shape"):  # control flow, or a Shape-
                rank = 4 if out.name in g.images else 2       # computed Reshape (rank 2)
                out.CopyFrom(self.value(out.name, [f"{out.name}_{i}" for i in range(rank)]))
        return model


def draw(rng: np.random.Generator) -> Case:
    """One random exporter-style graph."""
    return Generator(rng).draw()
