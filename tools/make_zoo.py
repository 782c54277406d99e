"""Build the coverage zoo: common CNNs and a transformer encoder, as real exporters write them.

Every architecture of :mod:`zoo_models` (ResNet-18/50, MobileNetV2, MobileNetV3-Small,
EfficientNet-B0, DenseNet-121, VGG-16-BN, ShuffleNetV2, U-Net, transformer encoder) gets random
weights and randomised but plausible BatchNorm statistics (gamma ~ U(0.5, 1.5), beta ~ N(0, 0.2),
running statistics measured on random inputs, then scaled by U(0.8, 1.25) / shifted by
N(0, 0.05 sigma)), and is exported four ways:

* ``legacy_bn``: TorchScript exporter, opset 17, ``do_constant_folding=False``,
  ``training=PRESERVE`` on an eval-mode model: BatchNormalization nodes kept;
* ``legacy_folded``: TorchScript exporter defaults: BN folded into the convs;
* ``dynamo_bn``: ``torch.onnx.export(dynamo=True, optimize=False)``: BN kept, the raw graph
  with its Shape/Expand/CastLike helper nodes;
* ``dynamo_folded``: ``dynamo=True`` defaults (onnxscript optimizer): BN folded.

The transformer has no BN; its four variants are ``legacy_erf`` (opset 17: GELU as the
Div/Erf/Add/Mul/Mul pattern), ``legacy_gelu`` (opset 20: the Gelu op), ``dynamo`` (Gelu op,
optimized) and ``dynamo_raw`` (``optimize=False``). All exports have a dynamic batch axis.

The ONNX package's backend "light" models (``onnx/backend/test/data/light/*.onnx``: opset-9
Caffe2 conversions whose weights are ``ConstantOfShape`` placeholders) are materialised with
seeded random values chosen by role (conv/gemm weights He-normal, biases and BN shifts small,
BN scales and variances in [0.5, 1.5]).

Every file is checked with the full ``onnx.checker``, the number of BatchNormalization nodes is
checked against the variant, and the ONNX Runtime output is compared with torch's.

Two sizes::

    python tools/make_zoo.py                 # full width -> bench_out/zoo/ (gitignored)
    python tools/make_zoo.py --fixtures      # reduced width -> tests/fixtures/zoo/ (committed)
    python tools/make_zoo.py --only resnet18,transformer --variants legacy_bn

The full zoo keeps every architecture at its published width with small inputs (96x96; VGG
needs 224x224 for its 7x7 Flatten -> Gemm, U-Net 64x64, the transformer 64 tokens of 384
features). The fixtures use width multipliers of 1/8 - 1/16 and 32x32 inputs (VGG keeps 224 with
a 64-wide classifier) so the test suite stays torch-free and fast, and are stored like the ONNX
package's own light models: weight-free skeletons (``ConstantOfShape`` placeholders, see
``tools/zoo_light.py``), gzipped, a few kB each; the tests put seeded random weights back. The
graph is exactly what the exporter wrote (checked on writing: same nodes and initializer shapes
after materialisation). The light models' fixtures are shrunk by the package itself (every
channel group, residual stages included, down to 1/8 of its channels, 1/64 for groups of
>= 2048; groups the package keeps fixed stay whole) after its behaviour-preserving
normalisation. A ``manifest.json`` describes each file.

Requires ``pip install torch==2.13.0 onnxscript`` (tools only; the package never imports torch).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

from zoo_light import light_dir, materialise, skeletonise  # noqa: E402

LIGHT = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
         "shufflenet", "squeezenet", "vgg19", "zfnet512")
CNN_VARIANTS = ("legacy_bn", "legacy_folded", "dynamo_bn", "dynamo_folded")
TRANSFORMER_VARIANTS = ("legacy_erf", "legacy_gelu", "dynamo", "dynamo_raw")


@dataclass
class Arch:
    """One architecture: builder(width, classes) and the full / fixture configurations."""

    name: str
    builder: str  # function name in zoo_models
    input: tuple[int, ...]  # full-zoo input shape without the batch axis
    width: float = 1.0
    classes: int = 1000
    fixture_input: tuple[int, ...] = (3, 32, 32)
    fixture_width: float = 0.125
    fixture_classes: int = 10
    extra: dict = field(default_factory=dict)  # builder keyword arguments (full)
    fixture_extra: dict = field(default_factory=dict)
    transformer: bool = False


ARCHS = [
    Arch("resnet18", "resnet18", (3, 96, 96)),
    Arch("resnet50", "resnet50", (3, 96, 96), fixture_width=1 / 16),
    Arch("mobilenet_v2", "mobilenet_v2", (3, 96, 96)),
    Arch("mobilenet_v3_small", "mobilenet_v3_small", (3, 96, 96)),
    Arch("efficientnet_b0", "efficientnet_b0", (3, 96, 96)),
    Arch("densenet121", "densenet121", (3, 96, 96)),
    Arch("vgg16_bn", "vgg16_bn", (3, 224, 224), fixture_input=(3, 224, 224),
         fixture_width=1 / 16, fixture_extra={"hidden": 64}),
    Arch("shufflenet_v2", "shufflenet_v2", (3, 96, 96)),
    Arch("unet", "unet", (3, 64, 64), classes=2, fixture_classes=2),
    Arch("transformer", "transformer", (64, 384), fixture_input=(8, 32), fixture_width=1 / 12,
         transformer=True),
]


# -- weights --------------------------------------------------------------------------------------
def randomise(model, seed: int, calib: tuple[int, ...]):
    """Random weights, random BN affine parameters, BN statistics measured on random inputs."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu",
                                        generator=gen)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.05, generator=gen)
            elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2 if isinstance(m, nn.BatchNorm2d) else 0.1,
                               generator=gen)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        model.eval()
        for m in bns:  # measure the statistics the random weights produce
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for _ in range(2):
            model(torch.randn((8, *calib), generator=gen))
        model.eval()
        for m in bns:
            n = m.num_features
            m.momentum = 0.1
            m.running_var.mul_(torch.empty(n).uniform_(0.8, 1.25, generator=gen))
            m.running_mean.add_(torch.randn(n, generator=gen) * 0.05 * m.running_var.sqrt())
    return model


def build(arch: Arch, fixture: bool, seed: int):
    import zoo_models

    fn = getattr(zoo_models, arch.builder)
    width = arch.fixture_width if fixture else arch.width
    classes = arch.fixture_classes if fixture else arch.classes
    kwargs = arch.fixture_extra if fixture else arch.extra
    model = fn(width, classes, **kwargs)
    shape = arch.fixture_input if fixture else arch.input
    return randomise(model, seed, shape), shape


# -- export ---------------------------------------------------------------------------------------
def export(model, x, path: Path, variant: str) -> None:
    import torch

    dynamo = variant.startswith("dynamo")
    keep_bn = variant in ("legacy_bn", "dynamo_bn", "dynamo_raw")
    names = {"input_names": ["input"], "output_names": ["output"]}
    if not dynamo:
        opset = 20 if variant == "legacy_gelu" else 17
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=opset,
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=not keep_bn,
            training=torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL,
            **names)
        return
    optimize = variant in ("dynamo_folded", "dynamo")
    prog = torch.onnx.export(model, (x,), dynamo=True, optimize=optimize,
                             dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},),
                             **names)
    prog.save(str(path))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def n_params(model: onnx.ModelProto) -> int:
    return int(sum(math.prod(t.dims) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT))


def ort_session(path_or_model) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    src = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) \
        else str(path_or_model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def strip_metadata(path: Path) -> None:
    """Drop the exporters' per-node metadata (source locations, stack traces) and doc strings:
    most of a small dynamo file; the graph itself is unchanged."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        node.ClearField("metadata_props")
        node.doc_string = ""
    model.ClearField("metadata_props")
    model.graph.doc_string = ""
    onnx.save(model, str(path))


def check_export(path: Path, variant: str, bn_modules: int, x: np.ndarray,
                 ref: np.ndarray) -> dict:
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    counts = op_counts(model)
    bn = counts.get("BatchNormalization", 0)
    if variant in ("legacy_bn", "dynamo_bn") and bn != bn_modules:
        raise RuntimeError(f"{path.name}: {bn} BatchNormalization nodes, expected {bn_modules}")
    if variant.endswith("folded") and bn >= max(1, bn_modules):
        raise RuntimeError(f"{path.name}: BatchNormalization not folded ({bn} nodes)")
    got = ort_session(path).run(None, {"input": x})[0]
    scale = float(np.abs(ref).max()) or 1.0
    diff = float(np.abs(got - ref).max())
    if diff > 2e-3 * scale:
        raise RuntimeError(f"{path.name}: ONNX Runtime differs from torch by {diff:.3g}")
    return {"ops": counts, "batchnorm": bn, "params": n_params(model),
            "bytes": path.stat().st_size, "torch_max_abs_diff": diff,
            "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))}


def make_arch(arch: Arch, out: Path, fixture: bool, seed: int,
              variants: set[str] | None) -> list[dict]:
    import torch
    from torch import nn

    model, shape = build(arch, fixture, seed)
    bn_modules = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    entries = []
    for variant in TRANSFORMER_VARIANTS if arch.transformer else CNN_VARIANTS:
        if variants and variant not in variants:
            continue
        path = out / f"{arch.name}__{variant}.onnx"
        t = time.perf_counter()
        export(model, torch.from_numpy(x), path, variant)
        if fixture:
            strip_metadata(path)
        info = check_export(path, variant, bn_modules, x, ref)
        if fixture:
            path = write_fixture(path)
            info["bytes"] = path.stat().st_size
        entries.append({"file": path.name, "arch": arch.name, "variant": variant,
                        "exporter": "dynamo" if variant.startswith("dynamo") else "legacy",
                        "input": [-1, *shape], "fixture": fixture, "seed": seed, **info,
                        "seconds": round(time.perf_counter() - t, 2)})
        print(f"  {path.name}: {info['params']:,} params, {info['bytes'] / 1e6:.2f} MB, "
              f"BN {info['batchnorm']}, torch diff {info['torch_max_abs_diff']:.2g}",
              flush=True)
    return entries


def write_fixture(path: Path) -> Path:
    """Store ``path`` as a weight-free skeleton (``zoo_light.skeletonise``), gzipped, and check
    that the materialised skeleton is the same graph and runs. Returns the new path."""
    model = onnx.load(str(path))
    skeleton = skeletonise(model)
    back = materialise(skeleton)
    if [n.op_type for n in back.graph.node] != [n.op_type for n in model.graph.node] or \
            sorted((t.name, tuple(t.dims)) for t in back.graph.initializer) != \
            sorted((t.name, tuple(t.dims)) for t in model.graph.initializer):
        raise RuntimeError(f"{path.name}: the skeleton does not give the same graph back")
    onnx.checker.check_model(back, full_check=True)
    ort_session(back)
    out = path.with_suffix(".onnx.gz")
    out.write_bytes(gzip.compress(skeleton.SerializeToString(), mtime=0))
    path.unlink()
    return out


# -- the ONNX backend light models ----------------------------------------------------------------
def shrink(model: onnx.ModelProto, keep: float = 1 / 8, big_keep: float = 1 / 64
           ) -> onnx.ModelProto:
    """A reduced-width copy made by the package itself: every channel group (residual stages
    included) keeps ``keep`` of its channels (``big_keep`` for groups of >= 2048)."""
    from onnx_udfc import api

    m = onnx.ModelProto()
    m.CopyFrom(model)
    api.normalize(m)
    a = api.analyse(m)
    ratios = {}
    for g in a.groups:
        k = max(2, math.ceil(g.size * (big_keep if g.size >= 2048 else keep)))
        ratios[g.id] = 1.0 - k / g.size if g.size > k else 0.0
    plan = api.plan(a, 0.0, prune_coupled=True, group_ratios=ratios)
    api.prune(a, plan)
    fresh = onnx.ModelProto()
    fresh.CopyFrom(a.model)
    api.normalize(fresh)  # drops what the removal left unused
    return fresh


def make_light(out: Path, fixture: bool, seed: int, only: set[str] | None) -> list[dict]:
    entries = []
    for name in LIGHT:
        if only and f"light_{name}" not in only and "light" not in only:
            continue
        src = light_dir() / f"light_{name}.onnx"
        model = materialise(onnx.load(str(src)), seed, redraw=True)
        if fixture:
            model = shrink(model)
            model.doc_string = (f"{src.name} materialised (seed {seed}) and shrunk by "
                                "tools/make_zoo.py")
        path = out / f"light_{name}.onnx"
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))
        sess = ort_session(path)
        inp = sess.get_inputs()[0]
        x = np.random.default_rng(seed).standard_normal(
            [d if isinstance(d, int) else 1 for d in inp.shape]).astype(np.float32)
        y = sess.run(None, {inp.name: x})[0]
        if not np.isfinite(y).all():
            raise RuntimeError(f"{path.name}: non-finite output")
        if fixture:
            path = write_fixture(path)
        entries.append({"file": path.name, "arch": f"light_{name}", "variant": "onnx_backend",
                        "exporter": "caffe2 (opset 9)", "input": list(inp.shape),
                        "fixture": fixture, "seed": seed, "ops": op_counts(model),
                        "batchnorm": op_counts(model).get("BatchNormalization", 0),
                        "params": n_params(model), "bytes": path.stat().st_size,
                        "opset": 9})
        print(f"  {path.name}: {entries[-1]['params']:,} params, "
              f"{entries[-1]['bytes'] / 1e6:.2f} MB", flush=True)
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", action="store_true",
                    help="reduced-width copies into tests/fixtures/zoo")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", default="", help="comma-separated architecture names "
                    "(light_<name> or 'light' for the backend models)")
    ap.add_argument("--variants", default="", help="comma-separated export variants")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out or (ROOT / ("tests/fixtures/zoo" if args.fixtures else "bench_out/zoo"))
    out.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s} or None
    variants = {s for s in args.variants.split(",") if s} or None

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    manifest_path = out / "manifest.json"
    manifest = {e["file"]: e for e in json.loads(manifest_path.read_text())} \
        if manifest_path.is_file() else {}
    for arch in ARCHS:
        if only and arch.name not in only:
            continue
        print(f"{arch.name}:", flush=True)
        for entry in make_arch(arch, out, args.fixtures, args.seed, variants):
            manifest[entry["file"]] = entry
    if not only or any(s.startswith("light") for s in only):
        print("ONNX backend light models:", flush=True)
        for entry in make_light(out, args.fixtures, args.seed, only):
            manifest[entry["file"]] = entry
    entries = [manifest[k] for k in sorted(manifest)]
    manifest_path.write_text(json.dumps(entries, indent=1) + "\n")
    total = sum(e["bytes"] for e in entries)
    print(f"{len(entries)} models, {total / 1e6:.1f} MB in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
