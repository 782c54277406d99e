"""``--plot``: per-layer kept channels, bits and predicted reconstruction error as one PNG.

matplotlib is optional (``pip install 'onnx-udfc[plot]'``).
"""

from __future__ import annotations

import os
from typing import Any

from onnx_udfc.core.errors import UdfcError


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UdfcError("--plot needs matplotlib (pip install 'onnx-udfc[plot]')") from None
    layers = report["layers"]
    if not layers:
        raise UdfcError("--plot: the model has no weight layers to plot")
    names = [layer["name"] for layer in layers]
    x = range(len(layers))
    fig, axes = plt.subplots(3, 1, figsize=(max(8.0, 0.18 * len(layers)), 9), sharex=True)
    before = [layer["out_channels_before"] for layer in layers]
    after = [layer["out_channels_after"] for layer in layers]
    axes[0].bar(x, before, color="#cccccc", label="before")
    axes[0].bar(x, after, color="#1f77b4", label="kept")
    axes[0].set_ylabel("output channels")
    axes[0].legend(loc="upper left")
    bits = [layer["bits"] or 32 for layer in layers]
    axes[1].bar(x, bits, color="#2ca02c")
    axes[1].set_ylabel("weight bits (32 = float)")
    errors = [layer["predicted_error"] or 0.0 for layer in layers]
    axes[2].bar(x, errors, color="#d62728")
    axes[2].set_ylabel("predicted error")
    axes[2].set_xticks(list(x))
    axes[2].set_xticklabels(names, rotation=90, fontsize=6)
    config = report.get("config", {})
    fig.suptitle(f"onnx-udfc: method {config.get('method', {}).get('name')}, "
                 f"prune {config.get('prune', {}).get('ratio')}, "
                 f"bits {config.get('quant', {}).get('bits')}")
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        raise UdfcError(f"{path}: cannot write plot ({exc.strerror})") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
