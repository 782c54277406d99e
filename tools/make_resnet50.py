"""Generate ResNet-50 benchmark models (random weights) as ONNX files (``--depth 18/101``: the
same recipe at other sizes, for tools/bench_speed.py).

Builds a torchvision-style ResNet-50 (bottleneck blocks [3, 4, 6, 3], stride on the 3x3
conv as in torchvision >= 0.2 "ResNet v1.5", 224x224 input, 1000 classes) in plain PyTorch
(torchvision is not required), with a fixed seed, Kaiming-normal conv init and plausible
BatchNorm statistics:

* ``running_mean ~ N(0, 0.1)``, ``running_var ~ U(0.5, 1.5)``
* ``weight ~ U(0.5, 1.5)``, ``bias ~ N(0, 0.1)``

and exports two ONNX files (opset 17, input ``input`` of shape ``[batch, 3, 224, 224]``
with a dynamic ``batch`` axis, output ``logits``) with the legacy TorchScript exporter:

* ``resnet50_bn.onnx``: BatchNormalization kept as separate inference-mode nodes
  (``do_constant_folding=False``, ``training=TrainingMode.PRESERVE`` on an eval-mode model),
* ``resnet50_folded.onnx``: BatchNormalization folded into the preceding Conv
  (``do_constant_folding=True``, ``training=TrainingMode.EVAL``).

Both files are checked with ``onnx.checker.check_model(path, full_check=True)`` and run in
onnxruntime against the torch logits on a random input.

Requires torch (CPU build is enough)::

    pip install torch==2.13.0

Run from the repository root::

    python tools/make_resnet50.py                     # writes bench_out/resnet50_{bn,folded}.onnx
    python tools/make_resnet50.py --out /tmp/models   # other output directory
    python tools/make_resnet50.py --seed 1 --batch 4  # other weights / verification batch
    python tools/make_resnet50.py --depth 18          # resnet18_{bn,folded}.onnx (basic blocks)

ResNet-18 uses torchvision's ``BasicBlock`` (two 3x3 convs, [2, 2, 2, 2]); ResNet-101 the
bottleneck blocks [3, 4, 23, 3].

The files are ~100 MB each; ``bench_out/`` is gitignored and they must not be committed.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

LAYERS: tuple[int, int, int, int] = (3, 4, 6, 3)
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", LAYERS), 101: ("bottleneck", (3, 4, 23, 3))}
NUM_CLASSES = 1000
OPSET = 17


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck``: 1x1 -> 3x3 (stride) -> 1x1 (x4), residual add, ReLU."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock``: 3x3 (stride) -> 3x3, residual add, ReLU."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision ``resnet50`` layout (same module names, so state dicts line up); other
    depths with ``block`` and ``layers``."""

    def __init__(
        self, layers: tuple[int, int, int, int] = LAYERS, num_classes: int = NUM_CLASSES,
        block: type[nn.Module] = Bottleneck,
    ) -> None:
        super().__init__()
        self.block = block
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        block, expansion = self.block, self.block.expansion
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def build_model(seed: int, depth: int = 50) -> ResNet50:
    """Random-weight ResNet-``depth`` in eval mode with plausible BN statistics."""
    torch.manual_seed(seed)
    kind, layers = DEPTHS[depth]
    model = ResNet50(layers, block=BasicBlock if kind == "basic" else Bottleneck)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu")
                nn.init.kaiming_normal_(
                    m.weight, mode="fan_out", nonlinearity="relu", generator=gen
                )
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / np.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
    return model.eval()


def export(model: nn.Module, path: Path, *, fold_bn: bool) -> None:
    """Legacy (TorchScript) export; ``fold_bn`` selects constant folding / BN folding."""
    dummy = torch.randn(1, 3, 224, 224)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=fold_bn,
        training=torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE,
        export_params=True,
    )


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def n_params(model: onnx.ModelProto) -> int:
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def verify(path: Path, *, expect_bn: bool, x: np.ndarray, ref: np.ndarray,
           n_bn: int = 53) -> dict[str, object]:
    """Structural checks + onnxruntime vs torch comparison; raises on failure."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    counts = op_counts(model)
    bn_nodes = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if expect_bn:
        if len(bn_nodes) != n_bn:
            raise RuntimeError(f"{path.name}: expected {n_bn} BatchNormalization nodes, "
                               f"got {counts}")
        bad = [n.name for n in bn_nodes if len(n.output) != 1]
        if bad:
            raise RuntimeError(f"{path.name}: training-mode BN (multiple outputs): {bad[:5]}")
        modes = {a.i for n in bn_nodes for a in n.attribute if a.name == "training_mode"}
        if modes - {0}:
            raise RuntimeError(f"{path.name}: BN training_mode attribute set: {modes}")
    elif bn_nodes:
        raise RuntimeError(f"{path.name}: {len(bn_nodes)} BatchNormalization nodes not folded")

    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    if ins != ["input"] or outs != ["logits"]:
        raise RuntimeError(f"{path.name}: unexpected I/O names {ins} -> {outs}")
    in_dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if in_dims != ["batch", 3, 224, 224]:
        raise RuntimeError(f"{path.name}: unexpected input shape {in_dims}")

    so = ort.SessionOptions()
    # Keep ORT from re-fusing BN so the BN graph is really executed as exported.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x})[0]
    diff = float(np.max(np.abs(got - ref)))
    rel = diff / float(np.max(np.abs(ref)))
    argmax_ok = bool(np.array_equal(got.argmax(1), ref.argmax(1)))
    if not np.allclose(got, ref, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(ref)))):
        raise RuntimeError(f"{path.name}: ORT logits differ from torch (max abs {diff:.3e})")
    return {
        "file_bytes": path.stat().st_size,
        "nodes": len(model.graph.node),
        "ops": counts,
        "initializers": len(model.graph.initializer),
        "params": n_params(model),
        "max_abs_diff": diff,
        "max_rel_diff": rel,
        "argmax_equal": argmax_ok,
        "input_dims": in_dims,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=2, help="batch size for the ORT check")
    ap.add_argument("--depth", type=int, default=50, choices=sorted(DEPTHS))
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build_model(args.seed, args.depth)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    torch_params = sum(p.numel() for p in model.parameters())
    bn_buffers = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.BatchNorm2d)
    )
    print(f"torch ResNet-{args.depth}: {torch_params:,} parameters "
          f"(+{bn_buffers:,} BN running stats)")

    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    print(f"torch logits: shape {ref.shape}, max |logit| {np.max(np.abs(ref)):.3f}")

    results: dict[str, dict[str, object]] = {}
    for name, fold in ((f"resnet{args.depth}_bn.onnx", False),
                       (f"resnet{args.depth}_folded.onnx", True)):
        path = args.out / name
        t0 = time.perf_counter()
        export(model, path, fold_bn=fold)
        t_export = time.perf_counter() - t0
        if model.training:  # export must not flip the module to training mode
            raise RuntimeError("model left in training mode after export")
        stray = sorted(p.name for p in args.out.glob(f"{name}*") if p.name != name)
        if stray:
            raise RuntimeError(f"unexpected external-data files next to {name}: {stray}")
        res = verify(path, expect_bn=not fold, x=x, ref=ref, n_bn=n_bn)
        res["export_s"] = t_export
        results[name] = res

    for name, res in results.items():
        size = int(res["file_bytes"])  # type: ignore[call-overload]
        print(f"\n{args.out / name}")
        print(f"  size        {size:,} B ({size / 2**20:.1f} MiB), export {res['export_s']:.1f} s")
        print(f"  params      {res['params']:,} in {res['initializers']} initializers")
        print(f"  nodes       {res['nodes']}: {res['ops']}")
        print(f"  input       {res['input_dims']}")
        print(
            f"  ORT vs torch max abs diff {res['max_abs_diff']:.3e} "
            f"(rel {res['max_rel_diff']:.2e}), argmax equal: {res['argmax_equal']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
