"""Text images rendered at bench time with PIL and the Debian DejaVu fonts: pages of random
words for the orientation classifier, short random strings for the CRNN recogniser."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf",
         "DejaVuSerif-Italic.ttf", "DejaVuSansCondensed.ttf"]
ALPHANUMERIC = string.ascii_letters + string.digits


def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / name
    if not path.exists():
        raise SystemExit(f"bench_realworld: font {path} missing (Debian: apt-get install "
                         "fonts-dejavu-core fonts-dejavu-extra)")
    return ImageFont.truetype(str(path), size)


def random_word(rng: np.random.Generator) -> str:
    """3-9 lowercase letters, sometimes capitalised, sometimes a number instead."""
    if rng.random() < 0.1:
        return str(rng.integers(1, 10_000))
    word = "".join(rng.choice(list(string.ascii_lowercase), rng.integers(3, 10)))
    return word.capitalize() if rng.random() < 0.2 else word


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Light Gaussian blur and pixel noise, as a scan or a photo of paper has."""
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 1.0))))
    pixels = np.asarray(image, np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(2.0, 10.0), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), image.mode)


def text_image(rng: np.random.Generator) -> Image.Image:
    """An upright RGB image filled with lines of random words in one random font and size,
    dark ink on a light tinted background: half of them pages (300-480 px a side), half strips
    of 1-3 lines (a cropped text line, the harder case)."""
    size = int(rng.integers(14, 33))
    width = int(rng.integers(300, 481))
    if rng.random() < 0.5:
        height = int(rng.integers(300, 481))
    else:
        height = int(size * (1.7 * int(rng.integers(1, 4)) + 0.6))
    typeface = font(str(rng.choice(FONTS)), size)
    paper = tuple(int(v) for v in rng.integers(215, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    page = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(page)
    margin = int(rng.integers(4, max(5, min(30, height // 4))))
    y = margin
    while y + size < height - margin:
        words, line = [], ""
        while True:
            candidate = " ".join([*words, random_word(rng)])
            if typeface.getlength(candidate) > width - 2 * margin:
                break
            words, line = candidate.split(" "), candidate
        draw.text((margin, y), line, font=typeface, fill=ink)
        y += int(size * rng.uniform(1.3, 1.9))
    return degrade(page, rng)


def text_string(rng: np.random.Generator) -> tuple[str, Image.Image]:
    """A random 4-8 character alphanumeric string, rendered on one grey line of height 64 with
    some jitter, and the string."""
    text = "".join(rng.choice(list(ALPHANUMERIC), rng.integers(4, 9)))
    size = int(rng.integers(30, 46))
    typeface = font(str(rng.choice(FONTS)), size)
    pad = int(rng.integers(4, 20))
    width = int(typeface.getlength(text)) + 2 * pad
    background = int(rng.integers(190, 256))
    line = Image.new("L", (width, 64), background)
    top = (64 - size) // 2 - 4 + int(rng.integers(-4, 5))
    ImageDraw.Draw(line).text((pad, top), text, font=typeface,
                              fill=int(rng.integers(0, background - 120)))
    return text, degrade(line, rng)
