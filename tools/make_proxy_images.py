"""Build ``onnx_udfc/moments/proxy_images/proxy_images.npz``, the built-in proxy image set of
``--moments proxy`` (:mod:`onnx_udfc.moments.proxy`), from public-domain / CC0 photographs that
scikit-image bundles (sources and licenses: ``proxy_images/LICENSES.md``).

The package reads the set with numpy only: each image is stored as a uint8 array, ``(H, W, 3)``
for colour, ``(H, W)`` for grey, its longer side downscaled to ``--side`` pixels (PIL, here in
tools/ only). scikit-image is not installed; its wheel is read as a zip::

    pip download scikit-image --no-deps -d bench_out/cache
    python tools/make_proxy_images.py --skimage-wheel bench_out/cache/scikit_image-0.26.0-*.whl
"""

from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "onnx_udfc" / "moments" / "proxy_images" \
    / "proxy_images.npz"
# matplotlib's grace_hopper.jpg is left out: its sample_data README names no license and its
# own issue tracker calls it both public domain and Creative Commons.
SKIMAGE = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",  # colour
           "camera.png", "brick.png", "grass.png", "gravel.png", "clock_motion.png"]  # grey


def shrink(data: bytes, side: int) -> np.ndarray:
    """The image in ``data`` as uint8, its longer side at most ``side`` (Lanczos)."""
    image = Image.open(io.BytesIO(data))
    image = image.convert("L" if image.getbands() == ("L",) else "RGB")
    scale = side / max(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skimage-wheel", type=Path, required=True)
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    with zipfile.ZipFile(args.skimage_wheel) as wheel:
        images = {Path(n).stem: shrink(wheel.read(f"skimage/data/{n}"), args.side)
                  for n in SKIMAGE}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **images)
    for name, array in images.items():
        print(f"{name:14s} {array.shape}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
