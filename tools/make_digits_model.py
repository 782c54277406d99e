"""Build the embedded default model: a small BatchNorm CNN trained on scikit-learn's digits.

The model is the project's built-in example for structured pruning + quantization. It is
trained on ``sklearn.datasets.load_digits`` (8x8 grayscale, 1797 images, bundled with
scikit-learn, no download) and exported to ONNX (opset 17) with the BatchNormalization nodes
kept as separate eval-mode nodes, so that the pruner sees Conv -> BN -> ReLU chains, a residual
``Add`` (coupled channel group) and a ``Gemm -> Relu -> Gemm`` head.

Run from the repository root (CPU only, deterministic, well under a minute)::

    python tools/make_digits_model.py

Requirements: torch (CPU), scikit-learn, onnx, onnxruntime, numpy. Outputs in ``models/``:

* ``digits_cnn_bn.onnx``  -- the model; input ``input`` (batch, 1, 8, 8), output ``logits``
  (batch, 10), dynamic batch axis named ``batch``.
* ``digits_test.npz``     -- the test split: ``images`` float32 (N, 1, 8, 8), already
  normalised as the model expects; ``labels`` int64 (N,).
* ``digits_cnn_bn.json``  -- metadata: preprocessing, test accuracy measured in ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
TEST_SIZE = 0.25
SPLIT_SEED = 0
OPSET = 17
EPOCHS = 40
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
ONNX_NAME = "digits_cnn_bn.onnx"
NPZ_NAME = "digits_test.npz"
JSON_NAME = "digits_cnn_bn.json"
DATASET_DESC = (
    f"sklearn digits test split (test_size={TEST_SIZE}, random_state={SPLIT_SEED}, stratified)"
)
MAX_ABS_DIFF = 1e-4


def set_determinism(seed: int) -> None:
    """Seed every RNG in play and force deterministic CPU kernels."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # thread count can change float reduction order
    torch.use_deterministic_algorithms(True)


def conv_bn(cin: int, cout: int) -> list[nn.Module]:
    """3x3 same-padding convolution followed by BatchNorm (bias folded into BN)."""
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout)]


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, identity shortcut, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(channels, channels)
        self.conv2, self.bn2 = conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + x)


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits with BN, a residual block, GAP and a two-layer Gemm head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 16), nn.ReLU(), *conv_bn(16, 32), nn.ReLU())
        self.block = ResidualBlock(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Sequential(*conv_bn(32, 64), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block(x)
        x = self.pool(x)
        x = self.conv3(x)
        x = torch.flatten(self.gap(x), 1)
        return self.fc2(F.relu(self.fc1(x)))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """Return normalised (x_train, y_train, x_test, y_test, mean, std); x as float32 NCHW."""
    digits = load_digits()
    x = digits.images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SPLIT_SEED, stratify=y
    )
    mean = float(x_tr.mean())
    std = float(x_tr.std())

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - mean) / std).astype(np.float32)[:, None, :, :]

    return norm(x_tr), y_tr, norm(x_te), y_te, mean, std


def random_shift(x: torch.Tensor, gen: torch.Generator, fill: float) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (zero-pixel fill)."""
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=fill)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, None, :, None].expand(n, 1, 8, 10)
    out = torch.gather(padded, 2, rows)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, None, :].expand(n, 1, 8, 8)
    return torch.gather(out, 3, cols)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, fill: float) -> None:
    """Adam + one-cycle cosine schedule, light shift augmentation."""
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(xt) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )
    model.train()
    for epoch in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), BATCH_SIZE):
            idx = perm[i : i + BATCH_SIZE]
            xb = random_shift(xt[idx], gen, fill)
            loss = F.cross_entropy(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 9 or epoch == EPOCHS - 1:
            print(f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}")


def export(model: nn.Module, path: Path) -> None:
    """Export with BN kept as separate eval-mode nodes (no Conv+BN fusion)."""
    model.eval()
    dummy = torch.zeros(1, 1, 8, 8)
    # TrainingMode.EVAL + constant folding fuses BN into Conv. PRESERVE with the module in
    # eval mode and no constant folding keeps BN nodes with running-stat semantics.
    # Note: the legacy exporter turns bit-identical initializers into Identity nodes (this
    # happens for an untrained net, whose BN stats are all 0/1); check_onnx rejects that.
    with warnings.catch_warnings():
        # The legacy (TorchScript) exporter is deprecated but is the one that can keep BN.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            export_params=True,
        )


def check_onnx(path: Path) -> Counter[str]:
    """Validate the exported graph; return its op counts."""
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    ops = Counter(n.op_type for n in m.graph.node)
    unexpected = set(ops) - {
        "Conv",
        "BatchNormalization",
        "Relu",
        "Add",
        "MaxPool",
        "GlobalAveragePool",
        "Flatten",
        "Gemm",
    }
    if unexpected:
        raise RuntimeError(f"unexpected ops in exported graph: {sorted(unexpected)}")
    n_bn = ops.get("BatchNormalization", 0)
    if n_bn != 5:
        raise RuntimeError(f"expected 5 BatchNormalization nodes, found {n_bn}: {dict(ops)}")
    for n in m.graph.node:
        if n.op_type == "BatchNormalization":
            if len(n.output) != 1:
                raise RuntimeError(f"BN node {n.name} has training-mode outputs: {n.output}")
            if any(a.name == "training_mode" and a.i != 0 for a in n.attribute):
                raise RuntimeError(f"BN node {n.name} has training_mode set")
    if [i.name for i in m.graph.input] != ["input"] or [o.name for o in m.graph.output] != [
        "logits"
    ]:
        raise RuntimeError("unexpected graph input/output names")
    dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
    if dim0.dim_param != "batch":
        raise RuntimeError(f"batch axis not dynamic: {dim0}")
    return ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "models",
        help="output directory (default: <repo>/models)",
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    set_determinism(SEED)
    x_tr, y_tr, x_te, y_te, mean, std = load_split()
    print(f"train {len(x_tr)}  test {len(x_te)}  mean {mean:.6f}  std {std:.6f}")

    model = DigitsCNN()
    train(model, x_tr, y_tr, fill=(0.0 - mean) / std)
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_te)).numpy()
    torch_acc = float((torch_logits.argmax(1) == y_te).mean())
    print(f"torch top-1 on test: {torch_acc:.4f}")

    onnx_path = out_dir / ONNX_NAME
    npz_path = out_dir / NPZ_NAME
    json_path = out_dir / JSON_NAME
    export(model, onnx_path)
    ops = check_onnx(onnx_path)
    print("ONNX ops:", dict(sorted(ops.items())))

    np.savez_compressed(npz_path, images=x_te.astype(np.float32), labels=y_te.astype(np.int64))

    # Measure in ONNX Runtime on the saved npz (what the project will actually use).
    data = np.load(npz_path)
    images, labels = data["images"], data["labels"]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ort_logits = sess.run(["logits"], {"input": images})[0]
    max_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"max |ort - torch| logits: {max_diff:.3g}")
    if max_diff >= MAX_ABS_DIFF:
        raise RuntimeError(f"ONNX Runtime logits differ from torch by {max_diff}")
    top1 = float((ort_logits.argmax(1) == labels).mean())
    print(
        f"ONNX Runtime top-1 on test: {top1:.4f} ({int(round(top1 * len(labels)))}/{len(labels)})"
    )

    meta = {
        "file": ONNX_NAME,
        "input": "input",
        "output": "logits",
        "preprocess": {"scale": 1.0 / 16.0, "mean": mean, "std": std},
        "dataset": DATASET_DESC,
        "n_test": int(len(labels)),
        "top1_test": top1,
        "params": int(sum(p.numel() for p in model.parameters())),
        "made_by": "tools/make_digits_model.py",
        "torch_version": torch.__version__,
    }
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    for p in (onnx_path, npz_path, json_path):
        print(f"wrote {p} ({p.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
