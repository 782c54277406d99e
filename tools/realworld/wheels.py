"""What the benchmark reads out of third-party wheels at bench time (never copied into the
repository): ddddocr's recogniser charset, RapidOCR's PP-OCRv4 text detector and
scikit-image's bundled sample photos."""

from __future__ import annotations

import ast
import io
import zipfile
from pathlib import Path

from PIL import Image

DDDDOCR_WHEEL = "ddddocr-1.6.1-py3-none-any.whl"
DDDDOCR_PIP = "pip download ddddocr==1.6.1 --no-deps -d {cache}"
SKIMAGE_PIP = "pip download scikit-image --no-deps -d {cache}"
# ddddocr 1.6.1 runs common.onnx ("beta") with this charset (models/model_loader.py,
# core/ocr_engine.py); common_old.onnx is its default model.
CHARSET_SOURCE = "ddddocr/models/charset_manager.py"
CHARSET_FUNCTION = "_get_beta_charset"


def wheel(cache: Path, pattern: str, pip_command: str) -> Path:
    """The newest wheel in ``cache`` matching ``pattern``, or SystemExit naming the download."""
    found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"bench_realworld: no {pattern} in {cache}; fetch it with: "
                         f"{pip_command.format(cache=cache)}")
    return found[-1]


def ddddocr_charset(cache: Path) -> list[str]:
    """The list literal that ``CharsetManager._get_beta_charset`` returns, index = class id."""
    path = wheel(cache, DDDDOCR_WHEEL, DDDDOCR_PIP)
    source = zipfile.ZipFile(path).read(CHARSET_SOURCE).decode("utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == CHARSET_FUNCTION:
            returned = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
            return list(ast.literal_eval(returned[0].value))
    raise SystemExit(f"bench_realworld: {CHARSET_FUNCTION} not found in {path}:{CHARSET_SOURCE}")


def ddddocr_model(cache: Path, name: str) -> Path:
    """``cache/dd/ddddocr/NAME``, unpacked from the ddddocr wheel when missing."""
    target = cache / "dd" / "ddddocr" / name
    if not target.exists():
        path = wheel(cache, DDDDOCR_WHEEL, DDDDOCR_PIP)
        zipfile.ZipFile(path).extract(f"ddddocr/{name}", cache / "dd")
    return target


RAPIDOCR_WHEEL = "rapidocr_onnxruntime-1.3.24-py3-none-any.whl"
RAPIDOCR_PIP = "pip download rapidocr_onnxruntime==1.3.24 --no-deps -d {cache}"


def rapidocr_model(cache: Path, name: str) -> Path:
    """``cache/rapidocr/rapidocr_onnxruntime/models/NAME``, unpacked from the RapidOCR wheel
    (Apache-2.0; PaddleOCR's PP-OCRv4 models converted with paddle2onnx) when missing."""
    member = f"rapidocr_onnxruntime/models/{name}"
    target = cache / "rapidocr" / member
    if not target.exists():
        zipfile.ZipFile(wheel(cache, RAPIDOCR_WHEEL, RAPIDOCR_PIP)).extract(member,
                                                                           cache / "rapidocr")
    return target


def skimage_photos(cache: Path) -> dict[str, Image.Image]:
    """Every png/jpg under ``skimage/data/`` of the scikit-image wheel, as RGB images."""
    path = wheel(cache, "scikit_image-*.whl", SKIMAGE_PIP)
    archive = zipfile.ZipFile(path)
    photos = {}
    for name in sorted(archive.namelist()):
        if name.startswith("skimage/data/") and name.endswith((".png", ".jpg")):
            image = Image.open(io.BytesIO(archive.read(name)))
            photos["skimage:" + name.rsplit("/", 1)[1]] = flatten_alpha(image)
    return photos


def flatten_alpha(image: Image.Image) -> Image.Image:
    """RGB, transparent pixels on white (grey, palette and 16-bit images converted first)."""
    if image.mode == "I;16" or image.mode == "I":
        image = image.point(lambda v: v / 256).convert("L")
    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")
