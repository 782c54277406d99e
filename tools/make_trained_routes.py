"""Train the two architectures whose compensation crosses a reader's BatchNorm or enters a
grouped Conv (issue 14 item 2), so that their repair is measured on trained weights: the zoo
fixtures are random, and no trained DenseNet or AlexNet can be fetched here.

    python tools/make_trained_routes.py            # -> bench_out/trained/

Data: the 10000 MNIST test images in ``../shared/data/mnist_test.npz``, the first 8000 to train
on, the last 2000 held out (``tools/bench_routes.py`` scores them), padded to 32x32 and
standardised. Models (CPU, seeded, a few minutes on 2 cores):

* ``densenet_mnist_{bn,folded}.onnx``: the zoo's DenseNet-121 builder at width 0.25 with dense
  blocks of 3, 6 and 4 layers: every dense layer's channels reach later layers through a
  BatchNorm after a Concat. Exported by the TorchScript exporter with BN kept, and with BN
  folded (the BNs after a Concat stay).
* ``grouped_mnist.onnx``: AlexNet's pattern, plain and 2-group convolutions, no BN.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from make_zoo import export  # noqa: E402
from zoo_models import DenseNet121  # noqa: E402

TRAIN = 8000
MEAN, STD = 0.1307, 0.3081


def mnist(shared: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images as ``[N, 1, 32, 32]`` standardised float32, and their labels."""
    data = np.load(shared / "data" / "mnist_test.npz")
    x = np.pad(data["images"].astype(np.float32) / 255.0, ((0, 0), (2, 2), (2, 2)))
    return ((x - MEAN) / STD)[:, None], data["labels"].astype(np.int64)


class GroupedNet(nn.Module):
    """AlexNet's pattern on one channel: grouped convs (2 groups) between plain ones."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 48, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(48, 96, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
            nn.Conv2d(96, 96, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(96, 64, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
                                        nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class OneChannel(nn.Module):
    """The zoo DenseNet reads 3 channels: the grey image is repeated."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.expand(-1, 3, -1, -1))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> float:
    """Adam, batches of 128, random shifts of up to 2 pixels; returns the last epoch's loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xs), generator=gen)
        for i in range(0, len(xs), 128):
            idx = order[i:i + 128]
            shift = [int(v) for v in torch.randint(-2, 3, (2,), generator=gen)]
            batch = torch.roll(xs[idx], shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(batch), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return float(loss.detach())


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_out" / "trained")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    x, y = mnist(args.shared)
    args.out.mkdir(parents=True, exist_ok=True)
    sample = torch.from_numpy(x[:2])
    meta = {}
    nets = {"densenet_mnist": OneChannel(DenseNet121(0.25, 10, blocks=(3, 6, 4))),
            "grouped_mnist": GroupedNet()}
    for name, net in nets.items():
        loss = train(net, x[:TRAIN], y[:TRAIN], args.epochs, args.seed)
        top1 = accuracy(net, x[TRAIN:], y[TRAIN:])
        variants = ("bn", "folded") if name.startswith("densenet") else ("",)
        for variant in variants:
            path = args.out / (f"{name}_{variant}.onnx" if variant else f"{name}.onnx")
            export(net, sample, path, f"legacy_{variant or 'folded'}")
            meta[path.name] = {"held_out_top1": top1, "last_loss": loss}
        print(name, f"held-out top-1 {100 * top1:.2f}", flush=True)
    (args.out / "trained.json").write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
