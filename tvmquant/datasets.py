"""Real images, text lines and fidelity metrics for the PP-OCR models (cls, det, rec).

The data comes from two sources, both deterministic and generated on the fly (no download,
nothing written to disk except by :func:`calibration_npz`):

* **Scanned images** from scikit-image: ``skimage.data.page()`` (a scanned book page) and
  ``skimage.data.text()`` (a photo of hand-drawn and printed text). Text-line crops are cut
  from them with the FP32 PP-OCR detector run by rapidocr-onnxruntime (its own
  pre-processing, DB post-processing, box sorting and rotated crop), and lines wider than
  the recognizer's static input are split at the widest inter-word gap.
* **Rendered text** drawn with Pillow's bundled font (``ImageFont.load_default(size=...)``,
  no system font needed): lines of English words, numbers, dates, prices and punctuation at
  several sizes and colours, and whole pages of such lines, with mild rotation, illumination
  gradient, blur, noise and JPEG artefacts.

Splits are disjoint by construction: ``"calib"`` uses ``text()``, the odd-numbered lines of
``page()`` and rendered items from one seed; ``"eval"`` uses ``page()`` (its even-numbered
lines for rec/cls, whole-page variants for det) and rendered items from another seed.

The pre-processing is rapidocr's: ``TextClassifier.resize_norm_img`` (cls, 3x48x192),
``TextRecognizer.resize_norm_img`` (rec, 3x48xW, right zero padding) and
``DetPreProcess.normalize``/``permute`` (det). The detector gets a fixed ``H x W`` input, so
pages are letterboxed (aspect ratio kept, padded with the page's own background colour)
instead of rapidocr's resize to a multiple of 32.

Metrics compare a test engine's outputs with the FP32 reference: :func:`cls_agreement`,
:func:`det_mask_iou`, :func:`det_box_agreement` (rapidocr's ``DBPostProcess`` and polygon
IoU), :func:`rec_agreement` and :func:`rec_char_accuracy` (CTC greedy decoding with
rapidocr's ``CTCLabelDecode`` and the dictionary stored in the rec model's metadata).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "CLS_SHAPE",
    "DET_SIZES",
    "INPUT_NAME",
    "MODEL_KINDS",
    "REC_HEIGHT",
    "SPLITS",
    "TextLine",
    "calibration_npz",
    "calibration_samples",
    "cls_agreement",
    "cls_inputs",
    "cls_labels",
    "det_box_agreement",
    "det_boxes",
    "det_inputs",
    "det_mask_iou",
    "det_pages",
    "edit_distance",
    "model_inputs",
    "model_path",
    "polygon_iou",
    "rec_agreement",
    "rec_char_accuracy",
    "rec_character_list",
    "rec_inputs",
    "rec_labels",
    "rec_text",
    "rec_texts",
    "text_lines",
]

INPUT_NAME = "x"
"""Name of the (single) graph input of the three PP-OCR ONNX models."""

MODEL_KINDS = ("cls", "det", "rec")
SPLITS = ("calib", "eval")
CLS_SHAPE = (3, 48, 192)
"""rapidocr's ``cls_image_shape``."""
REC_HEIGHT = 48
"""Height of rapidocr's ``rec_img_shape`` (its width is 320)."""
DET_SIZES = ((320, 320), (640, 640))
"""Detector input sizes (H, W) used by the benchmarks."""

# Maximum width/height ratio of a text-line crop: 320/48 = 6.67 would fill the recognizer's
# static input; a little less keeps every line (almost) unsquashed.
_MAX_LINE_RATIO = 6.4

_SEEDS = {"calib": 20240611, "eval": 91731}
# Number of items per split: rendered text lines, rendered pages, scanned-page variants.
_N_LINES = {"calib": 96, "eval": 120}
_N_PAGES = {"calib": 28, "eval": 12}
_N_SCANNED_VARIANTS = 4

_WORDS = """
the of and to in is was for that with as on by at from this be are or have an which it not
but all were when we there can more one their has been if will would about time other some
into only its new also any these two may first then do most over such after between many
those where under while before three through used about between data model system value
quantization integer float tensor layer kernel compiler memory network output input scale
range calibration accuracy latency throughput batch channel weight bias activation result
region based segmentation markers coins background pixels label object histogram grey values
printed text page line word letter number paper ink scan image photo camera light shadow
river mountain garden window station street market coffee bread apple orange water summer
winter morning evening library museum theatre history science music health travel office
Monday Tuesday Friday Sunday January March August October December London Paris Berlin
Tokyo Madrid Boston Chicago Sydney Toronto Dublin Lisbon Oslo Prague Vienna Geneva Seattle
Total Invoice Receipt Subtotal Discount Amount Balance Address Phone Email Order Customer
Open Closed Exit Entrance Parking Warning Caution Notice Welcome Information Platform Gate
quick brown fox jumps lazy dog pack my box with five dozen liquor jugs sphinx of black quartz
judge vow
""".split()

_PUNCT_AFTER = [",", ".", ":", ";", "!", "?", ")", "'s", "-"]


@dataclass(frozen=True)
class TextLine:
    """One text-line image.

    Attributes
    ----------
    image : numpy.ndarray
        BGR ``uint8`` image, ``H x W x 3`` (OpenCV layout, as rapidocr expects).
    text : str or None
        The rendered string for rendered lines; ``None`` for crops of scanned images.
    source : str
        ``"rendered"``, ``"scanned:page"`` or ``"scanned:text"``.
    """

    image: np.ndarray
    text: str | None
    source: str


# --------------------------------------------------------------------------------------------
# rapidocr glue
# --------------------------------------------------------------------------------------------


@functools.cache
def _rapidocr_config() -> dict:
    """rapidocr-onnxruntime's default ``config.yaml`` (Det/Cls/Rec sections)."""
    from rapidocr_onnxruntime.main import DEFAULT_CFG_PATH
    from rapidocr_onnxruntime.utils import read_yaml

    return read_yaml(DEFAULT_CFG_PATH)


@functools.cache
def _det_preprocess():
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DetPreProcess

    det = _rapidocr_config()["Det"]
    return DetPreProcess(det["limit_side_len"], det["limit_type"], det["mean"], det["std"])


def _db_postprocess(**overrides: float):
    """rapidocr's ``DBPostProcess`` with the parameters of its default config."""
    from rapidocr_onnxruntime.ch_ppocr_det.utils import DBPostProcess

    det = _rapidocr_config()["Det"]
    kwargs = {
        "thresh": det["thresh"],
        "box_thresh": det["box_thresh"],
        "max_candidates": det["max_candidates"],
        "unclip_ratio": det["unclip_ratio"],
        "use_dilation": det["use_dilation"],
        "score_mode": det["score_mode"],
    }
    kwargs.update(overrides)
    return DBPostProcess(**kwargs)


_MODEL_FILES = {
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}


def model_path(kind: str) -> Path:
    """The PP-OCR ONNX model of ``kind`` ('cls', 'det' or 'rec').

    :func:`tvmquant.zoo.ppocr_model_path`; when this module is loaded on its own (outside the
    package, e.g. by the benchmark while the package does not import), the file is looked up
    in the installed rapidocr-onnxruntime package's ``models`` folder.
    """
    try:
        from .zoo import ppocr_model_path
    except ImportError:
        import importlib.util

        if kind not in _MODEL_FILES:
            raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
        spec = importlib.util.find_spec("rapidocr_onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("rapidocr-onnxruntime is not installed",
                                      name="rapidocr_onnxruntime") from None
        root = Path(next(iter(spec.submodule_search_locations)))
        return root / "models" / _MODEL_FILES[kind]
    return Path(ppocr_model_path(kind))


@functools.cache
def _ctc_decoder():
    """rapidocr's ``CTCLabelDecode`` with the dictionary stored in the rec model.

    The ``character`` metadata of ``ch_PP-OCRv4_rec_infer.onnx`` is read exactly as
    rapidocr's ``TextRecognizer`` does (``splitlines``); ``CTCLabelDecode`` then adds the
    blank (index 0) and the space (last index).
    """
    import onnx
    from rapidocr_onnxruntime.ch_ppocr_rec.utils import CTCLabelDecode

    model = onnx.load(str(model_path("rec")), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise ValueError("the PP-OCR rec model has no 'character' metadata")
    return CTCLabelDecode(character=meta["character"].splitlines())


def rec_character_list() -> tuple[str, ...]:
    """The rec model's CTC alphabet: index 0 is ``"blank"``, the last entry is a space."""
    return tuple(_ctc_decoder().character)


def _cls_resize_norm(img: np.ndarray) -> np.ndarray:
    from rapidocr_onnxruntime.ch_ppocr_cls.text_cls import TextClassifier

    # The method only reads ``cls_image_shape``; no ONNX session is needed.
    owner = types.SimpleNamespace(cls_image_shape=list(CLS_SHAPE))
    return TextClassifier.resize_norm_img(owner, img)


def _rec_resize_norm(img: np.ndarray, width: int) -> np.ndarray:
    from rapidocr_onnxruntime.ch_ppocr_rec.text_recognize import TextRecognizer

    # The method only reads ``rec_image_shape``; no ONNX session is needed.
    owner = types.SimpleNamespace(rec_image_shape=[3, REC_HEIGHT, width])
    return TextRecognizer.resize_norm_img(owner, img, width / REC_HEIGHT)


def _det_preprocess_static(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Letterbox a BGR page into ``size`` (H, W) and normalise it as rapidocr does."""
    import cv2

    out_h, out_w = size
    h, w = img.shape[:2]
    scale = min(out_h / h, out_w / w)
    new_h = max(1, min(out_h, round(h * scale)))
    new_w = max(1, min(out_w, round(w * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(img, (new_w, new_h), interpolation=interp)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
    canvas = np.empty((out_h, out_w, 3), np.uint8)
    canvas[...] = np.median(border, axis=0).astype(np.uint8)
    canvas[:new_h, :new_w] = resized
    pre = _det_preprocess()
    return pre.permute(pre.normalize(canvas))[np.newaxis].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@functools.cache
def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _token(rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.72:
        word = str(rng.choice(_WORDS))
        c = rng.random()
        if c < 0.2:
            word = word.capitalize()
        elif c < 0.27:
            word = word.upper()
        if rng.random() < 0.18:
            word += str(rng.choice(_PUNCT_AFTER))
        if rng.random() < 0.04:
            word = f'"{word}"'
        return word
    kind = int(rng.integers(0, 9))
    if kind == 0:
        return str(int(rng.integers(0, 100000)))
    if kind == 1:
        return f"{rng.integers(0, 1000)}.{rng.integers(0, 100):02d}"
    if kind == 2:
        return f"${rng.integers(1, 500)}.{rng.integers(0, 100):02d}"
    if kind == 3:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1990, 2031)}"
    if kind == 4:
        return f"{rng.integers(0, 24):02d}:{rng.integers(0, 60):02d}"
    if kind == 5:
        return f"{rng.integers(0, 101)}%"
    if kind == 6:
        return f"No.{rng.integers(1, 999)}"
    if kind == 7:
        return f"({rng.integers(1, 99)})"
    return f"+1-{rng.integers(200, 999)}-{rng.integers(1000, 9999)}"


def _phrase(rng: np.random.Generator, size: int, max_width: float) -> str:
    """Tokens joined by spaces, as many as fit in ``max_width`` pixels (at least one)."""
    font = _font(size)
    words = [_token(rng)]
    while True:
        candidate = " ".join([*words, _token(rng)])
        if font.getlength(candidate) > max_width:
            return " ".join(words)
        words = candidate.split(" ")


def _colors(rng: np.random.Generator, dark: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    light = tuple(int(v) for v in rng.integers(205, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 70, 3))
    if rng.random() < 0.15:  # coloured ink (blue/red stamps, links)
        ink = tuple(int(v) for v in rng.permutation([int(rng.integers(120, 200)), 20, 30]))
    return (ink, light) if dark else (light, ink)


def _degrade(rng: np.random.Generator, img: np.ndarray, max_angle: float) -> np.ndarray:
    """Mild realism: rotation, illumination gradient, blur, sensor noise, JPEG artefacts."""
    import cv2

    h, w = img.shape[:2]
    angle = float(rng.uniform(-max_angle, max_angle))
    if abs(angle) > 0.2:
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        img = cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    out = img.astype(np.float32)
    if rng.random() < 0.5:
        lo = float(rng.uniform(0.8, 1.0))
        horizontal = rng.random() < 0.5
        ramp = np.linspace(lo, 1.0, w if horizontal else h, dtype=np.float32)
        if rng.random() < 0.5:
            ramp = ramp[::-1]
        out *= ramp[np.newaxis, :, np.newaxis] if horizontal else ramp[:, np.newaxis, np.newaxis]
    if rng.random() < 0.45:
        sigma = float(rng.uniform(0.4, 1.1))
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    noise = float(rng.uniform(0.0, 7.0))
    out += rng.normal(0.0, noise, out.shape).astype(np.float32)
    img = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(45, 90))])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return img


def _render_line(rng: np.random.Generator) -> TextLine:
    import cv2
    from PIL import Image, ImageDraw

    size = int(rng.choice([14, 16, 18, 20, 24, 28, 32, 40, 48]))
    stroke = 1 if (size >= 24 and rng.random() < 0.2) else 0
    font = _font(size)
    pad_x = int(rng.integers(2, max(3, size // 2)))
    pad_y = int(rng.integers(2, max(3, size // 3)))
    approx_h = 1.15 * size + 2 * pad_y
    ratio = float(rng.uniform(1.2, _MAX_LINE_RATIO - 0.3))
    text = _phrase(rng, size, max(size, ratio * approx_h - 2 * pad_x))
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    width, height = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    bg, ink = _colors(rng, dark=rng.random() < 0.08)
    pil = Image.new("RGB", (width, height), bg)
    ImageDraw.Draw(pil).text((pad_x - left, pad_y - top), text, font=font, fill=ink,
                             stroke_width=stroke, stroke_fill=ink)
    img = cv2.cvtColor(np.asarray(pil), cv2.COLOR_RGB2BGR)
    return TextLine(_degrade(rng, img, max_angle=1.5), text, "rendered")


def _render_page(rng: np.random.Generator) -> np.ndarray:
    import cv2
    from PIL import Image, ImageDraw

    height, width = (int(v) for v in rng.choice([(640, 640), (720, 960), (960, 720),
                                                  (800, 800), (600, 900)]))
    dark = rng.random() < 0.15
    bg, ink = _colors(rng, dark)
    pil = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(pil)
    margin = int(rng.integers(16, 60))
    y = margin
    first = True
    while True:
        size = int(rng.choice([40, 48, 56, 64])) if first else int(
            rng.choice([16, 18, 20, 24, 28, 32, 40]))
        first = False
        spacing = float(rng.uniform(1.3, 1.9))
        if y + size > height - margin:
            break
        block_ink = ink if rng.random() < 0.8 else _colors(rng, dark)[1]
        indent = margin + int(rng.integers(0, max(1, width // 4)))
        for _ in range(int(rng.integers(1, 6))):
            if y + size > height - margin:
                break
            x = indent + int(rng.integers(0, 12))
            avail = (width - margin - x) * float(rng.uniform(0.35, 1.0))
            if avail < size:
                break
            draw.text((x, y), _phrase(rng, size, avail), font=_font(size), fill=block_ink)
            y += int(size * spacing)
        y += int(rng.integers(0, 2 * size))
    img = cv2.cvtColor(np.asarray(pil), cv2.COLOR_RGB2BGR)
    return _degrade(rng, img, max_angle=3.0)


# --------------------------------------------------------------------------------------------
# Scanned images
# --------------------------------------------------------------------------------------------


@functools.cache
def _scanned(name: str) -> np.ndarray:
    """``skimage.data.page()`` or ``skimage.data.text()`` as a BGR uint8 image."""
    import cv2
    import skimage.data

    gray = getattr(skimage.data, name)()
    return cv2.cvtColor(np.ascontiguousarray(gray, dtype=np.uint8), cv2.COLOR_GRAY2BGR)


def _scanned_variant(rng: np.random.Generator, img: np.ndarray, index: int) -> np.ndarray:
    """Variant ``index`` of a scanned page: as is, rotated, cropped-and-zoomed, degraded."""
    import cv2

    h, w = img.shape[:2]
    if index == 0:
        return img.copy()
    if index == 1:
        angle = float(rng.choice([-1, 1]) * rng.uniform(1.5, 3.0))
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    if index == 2:
        ch, cw = int(h * rng.uniform(0.6, 0.85)), int(w * rng.uniform(0.6, 0.85))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return img[y0:y0 + ch, x0:x0 + cw].copy()
    gamma = float(rng.uniform(0.7, 1.4))
    lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma, 0, 255).astype(np.uint8)
    return _degrade(rng, cv2.LUT(img, lut), max_angle=1.0)


def _split_wide(crop: np.ndarray, max_ratio: float = _MAX_LINE_RATIO) -> list[np.ndarray]:
    """Cut a too-wide line crop into pieces at inter-word gaps.

    Pieces are at most ``1.25 * max_ratio`` times as wide as high (the recognizer squashes
    the excess by at most 20 %); each cut is at the emptiest column (ink smoothed over half
    the line height, so word gaps win over letter gaps) between ``0.4`` and ``1.25`` times
    ``max_ratio * height`` from the previous cut.
    """
    h, w = crop.shape[:2]
    max_w = int(1.25 * max_ratio * h)
    if w <= max_w:
        return [crop]
    ink = 255.0 - crop.mean(axis=(0, 2))
    k = max(1, h // 2)
    ink = np.convolve(ink, np.ones(k) / k, mode="same")
    pieces, start = [], 0
    while w - start > max_w:
        lo, hi = start + int(0.32 * max_w), start + max_w
        cut = lo + int(np.argmin(ink[lo:hi]))
        pieces.append(crop[:, start:cut])
        start = cut
    if w - start >= h:
        pieces.append(crop[:, start:])
    return [np.ascontiguousarray(p) for p in pieces]


@functools.cache
def _scanned_lines(name: str) -> tuple[np.ndarray, ...]:
    """Text-line crops of a scanned image found by the FP32 detector (rapidocr pipeline)."""
    from rapidocr_onnxruntime import RapidOCR

    img = _scanned(name)
    ocr = RapidOCR()
    boxes, _ = ocr.auto_text_det(img)
    if not boxes:
        logger.warning("the FP32 detector found no text in skimage.data.%s()", name)
        return ()
    crops = ocr.get_crop_img_list(img, boxes)
    logger.debug("skimage.data.%s(): %d detected lines", name, len(crops))
    return tuple(c for c in crops if min(c.shape[:2]) >= 8)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    pages: tuple[np.ndarray, ...]
    lines: tuple[TextLine, ...]


def _rng(split: str, *key: int) -> np.random.Generator:
    return np.random.default_rng([_SEEDS[split], *key])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


@functools.cache
def _build_split(split: str) -> _Split:
    """All raw pages and lines of a split (deterministic; cached per process)."""
    _check_split(split)
    scanned_name = "page" if split == "eval" else "text"
    pages = [
        _scanned_variant(_rng(split, 1, i), _scanned(scanned_name), i)
        for i in range(_N_SCANNED_VARIANTS)
    ]
    pages += [_render_page(_rng(split, 2, i)) for i in range(_N_PAGES[split])]

    lines: list[TextLine] = []
    for name in ("page", "text"):
        for i, crop in enumerate(_scanned_lines(name)):
            if name == "page" and (i % 2 == 0) != (split == "eval"):
                continue
            if name == "text" and split == "eval":
                continue
            lines += [TextLine(p, None, f"scanned:{name}") for p in _split_wide(crop)]
    lines += [_render_line(_rng(split, 3, i)) for i in range(_N_LINES[split])]
    order = _rng(split, 4).permutation(len(lines))
    return _Split(tuple(pages), tuple(lines[i] for i in order))


def _take(items: Sequence, n: int | None) -> list:
    if n is None:
        return list(items)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if n > len(items):
        raise ValueError(f"asked for {n} samples but the split has only {len(items)}")
    return list(items[:n])


def det_pages(split: str = "eval", n: int | None = None) -> list[np.ndarray]:
    """Raw pages (BGR ``uint8``, various sizes) of a split, before pre-processing."""
    return [p.copy() for p in _take(_build_split(split).pages, n)]


def text_lines(split: str = "eval", n: int | None = None) -> list[TextLine]:
    """Raw text lines of a split (scanned crops and rendered lines, shuffled)."""
    return [TextLine(t.image.copy(), t.text, t.source)
            for t in _take(_build_split(split).lines, n)]


def det_inputs(size: tuple[int, int] = (320, 320), split: str = "eval",
               n: int | None = None) -> list[np.ndarray]:
    """Detector inputs: pages letterboxed to ``size`` = (H, W), normalised.

    Parameters
    ----------
    size : tuple of int
        Static input height and width (multiples of 32 for the DB head).
    split : {"calib", "eval"}
    n : int, optional
        The first ``n`` pages (all by default: 32 calib, 16 eval).

    Returns
    -------
    list of numpy.ndarray
        Each ``1 x 3 x H x W`` ``float32``.
    """
    h, w = (int(v) for v in size)
    if h % 32 or w % 32 or h <= 0 or w <= 0:
        raise ValueError(f"det size must be positive multiples of 32, got {size}")
    return [_det_preprocess_static(p, (h, w)) for p in _take(_build_split(split).pages, n)]


def rec_inputs(width: int = 320, split: str = "eval", n: int | None = None) -> list[np.ndarray]:
    """Recognizer inputs: text lines resized to height 48 and right-padded to ``width``.

    Returns
    -------
    list of numpy.ndarray
        Each ``1 x 3 x 48 x width`` ``float32`` (by default 109 calib, 127 eval lines).
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    lines = _take(_build_split(split).lines, n)
    return [_rec_resize_norm(t.image, int(width))[np.newaxis] for t in lines]


def rec_labels(split: str = "eval", n: int | None = None) -> list[str | None]:
    """Ground-truth strings of :func:`rec_inputs` (``None`` for scanned crops)."""
    return [t.text for t in _take(_build_split(split).lines, n)]


def _cls_items(split: str) -> list[tuple[np.ndarray, int]]:
    import cv2

    items = []
    for t in _build_split(split).lines:
        items.append((t.image, 0))
        items.append((cv2.rotate(t.image, cv2.ROTATE_180), 1))
    return items


def cls_inputs(split: str = "eval", n: int | None = None) -> list[np.ndarray]:
    """Orientation-classifier inputs: each text line upright, then rotated by 180 degrees.

    Returns
    -------
    list of numpy.ndarray
        Each ``1 x 3 x 48 x 192`` ``float32`` (by default 218 calib, 254 eval).
    """
    return [_cls_resize_norm(img)[np.newaxis] for img, _ in _take(_cls_items(split), n)]


def cls_labels(split: str = "eval", n: int | None = None) -> list[int]:
    """True class index of :func:`cls_inputs`: 0 for upright (label '0'), 1 for '180'."""
    return [label for _, label in _take(_cls_items(split), n)]


def model_inputs(kind: str, split: str = "eval", n: int | None = None, *,
                 det_size: tuple[int, int] = (320, 320), rec_width: int = 320
                 ) -> list[np.ndarray]:
    """Pre-processed inputs of model ``kind`` ('cls', 'det' or 'rec')."""
    if kind == "cls":
        return cls_inputs(split, n)
    if kind == "det":
        return det_inputs(det_size, split, n)
    if kind == "rec":
        return rec_inputs(rec_width, split, n)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def calibration_samples(kind: str, n: int | None = None, **kwargs) -> list[dict[str, np.ndarray]]:
    """Calibration split as ``[{"x": array}, ...]`` (what ``tvmquant.quantize`` takes).

    Keyword arguments go to :func:`model_inputs` (``det_size``, ``rec_width``).
    """
    return [{INPUT_NAME: x} for x in model_inputs(kind, "calib", n, **kwargs)]


def calibration_npz(kind: str, path: str | os.PathLike, n: int | None = None,
                    **kwargs) -> Path:
    """Write the calibration split of model ``kind`` to an ``.npz`` file.

    The file holds one array named ``x`` of shape ``N x 1 x 3 x H x W`` (samples stacked on
    a new leading axis). It is written atomically (temporary file, then ``os.replace``).

    Parameters
    ----------
    kind : {"cls", "det", "rec"}
    path : path-like
        Destination; its directory is created if needed.
    n : int, optional
        Number of samples (all by default).
    **kwargs
        ``det_size`` or ``rec_width``, see :func:`model_inputs`.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    samples = model_inputs(kind, "calib", n, **kwargs)
    if not samples:
        raise ValueError("no calibration samples to write (n=0)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", prefix=f".{path.stem}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{INPUT_NAME: np.stack(samples)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _as_list(x: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(x)] if isinstance(x, np.ndarray) else [np.asarray(a) for a in x]


def cls_agreement(ref_probs: np.ndarray | Sequence[np.ndarray],
                  test_probs: np.ndarray | Sequence[np.ndarray]) -> float:
    """Fraction of samples whose arg-max class agrees.

    Parameters
    ----------
    ref_probs, test_probs : array or sequence of arrays
        Classifier outputs, each ``N x C`` (``1 x 2`` per sample for PP-OCR cls).
    """
    ref = np.concatenate([a.reshape(-1, a.shape[-1]) for a in _as_list(ref_probs)])
    test = np.concatenate([a.reshape(-1, a.shape[-1]) for a in _as_list(test_probs)])
    if ref.shape != test.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {test.shape}")
    if len(ref) == 0:
        return 1.0
    return float(np.mean(ref.argmax(-1) == test.argmax(-1)))


def _prob_map(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    if m.ndim == 4:
        if m.shape[0] != 1 or m.shape[1] != 1:
            raise ValueError(f"expected a 1x1xHxW probability map, got {m.shape}")
        m = m[0, 0]
    elif m.ndim == 3:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"expected a probability map, got shape {m.shape}")
    return m


def det_mask_iou(ref_map: np.ndarray | Sequence[np.ndarray],
                 test_map: np.ndarray | Sequence[np.ndarray], thresh: float = 0.3) -> float:
    """IoU of the binarised DB probability maps (``> thresh``, rapidocr's ``thresh``).

    For sequences of maps the intersections and unions are summed over all pages. Two empty
    masks count as a perfect match (1.0).
    """
    refs, tests = _as_list(ref_map), _as_list(test_map)
    if len(refs) != len(tests):
        raise ValueError(f"{len(refs)} reference maps but {len(tests)} test maps")
    inter = union = 0
    for r, t in zip(refs, tests, strict=True):
        r, t = _prob_map(r) > thresh, _prob_map(t) > thresh
        if r.shape != t.shape:
            raise ValueError(f"shape mismatch: {r.shape} vs {t.shape}")
        inter += int(np.count_nonzero(r & t))
        union += int(np.count_nonzero(r | t))
    return 1.0 if union == 0 else inter / union


def det_boxes(prob_map: np.ndarray, **overrides: float) -> np.ndarray:
    """Text boxes from a DB probability map with rapidocr's ``DBPostProcess``.

    Boxes are in map pixel coordinates, ``K x 4 x 2`` ``int32``; ``overrides`` change the
    post-processing parameters of rapidocr's config (``thresh``, ``box_thresh``, ...).
    """
    m = _prob_map(prob_map)
    boxes, _ = _db_postprocess(**overrides)(m[np.newaxis, np.newaxis], m.shape)
    return np.asarray(boxes, dtype=np.int32).reshape(-1, 4, 2)


def polygon_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two polygons given as ``K x 2`` vertex arrays (shapely)."""
    from shapely.geometry import Polygon

    pa, pb = Polygon(np.asarray(a, float)), Polygon(np.asarray(b, float))
    if not pa.is_valid:
        pa = pa.buffer(0)
    if not pb.is_valid:
        pb = pb.buffer(0)
    union = pa.union(pb).area
    return 0.0 if union <= 0 else float(pa.intersection(pb).area / union)


def _match_count(ref_boxes: np.ndarray, test_boxes: np.ndarray, iou: float) -> int:
    """Reference boxes matched one-to-one (greedy by IoU) by a test box with IoU >= iou."""
    pairs = []
    for i, r in enumerate(ref_boxes):
        for j, t in enumerate(test_boxes):
            v = polygon_iou(r, t)
            if v >= iou:
                pairs.append((v, i, j))
    used_r, used_t = set(), set()
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_r and j not in used_t:
            used_r.add(i)
            used_t.add(j)
    return len(used_r)


def det_box_agreement(ref_map: np.ndarray | Sequence[np.ndarray],
                      test_map: np.ndarray | Sequence[np.ndarray], iou: float = 0.9) -> float:
    """Fraction of reference boxes matched by a test box with polygon IoU >= ``iou``.

    Both maps go through rapidocr's DB post-processing (:func:`det_boxes`); matching is
    one-to-one. For sequences of maps the counts are summed over pages. With no reference
    box at all the result is 1.0 if the test has none either, else 0.0.
    """
    refs, tests = _as_list(ref_map), _as_list(test_map)
    if len(refs) != len(tests):
        raise ValueError(f"{len(refs)} reference maps but {len(tests)} test maps")
    matched = total = extra = 0
    for r, t in zip(refs, tests, strict=True):
        rb, tb = det_boxes(r), det_boxes(t)
        matched += _match_count(rb, tb, iou)
        total += len(rb)
        extra += len(tb)
    if total == 0:
        return 1.0 if extra == 0 else 0.0
    return matched / total


def rec_texts(probs: np.ndarray) -> list[str]:
    """CTC greedy decoding of ``N x T x C`` (or ``T x C``) probabilities, one string each.

    rapidocr's ``CTCLabelDecode``: arg-max per time step, repeats collapsed, blanks (index
    0) removed, indices mapped through :func:`rec_character_list`.
    """
    p = np.asarray(probs)
    if p.ndim == 2:
        p = p[np.newaxis]
    if p.ndim != 3:
        raise ValueError(f"expected N x T x C or T x C probabilities, got shape {p.shape}")
    decoder = _ctc_decoder()
    if p.shape[-1] != len(decoder.character):
        raise ValueError(f"{p.shape[-1]} classes but the dictionary has "
                         f"{len(decoder.character)} (blank + characters + space)")
    return [text for text, _ in decoder(p)]


def rec_text(probs: np.ndarray) -> str:
    """The decoded string of one sample's CTC probabilities (``1 x T x C`` or ``T x C``)."""
    texts = rec_texts(probs)
    if len(texts) != 1:
        raise ValueError(f"expected one sample, got {len(texts)}; use rec_texts")
    return texts[0]


def _texts(items: Sequence[np.ndarray | str]) -> list[str]:
    return [x if isinstance(x, str) else rec_text(x) for x in items]


def rec_agreement(ref: Sequence[np.ndarray | str], test: Sequence[np.ndarray | str],
                  ignore_space: bool = False) -> float:
    """Fraction of samples whose decoded strings are identical.

    Parameters
    ----------
    ref, test : sequence of numpy.ndarray or str
        Per-sample CTC probabilities (``1 x T x C``) or already decoded strings.
    ignore_space : bool
        Remove all spaces before comparing (PaddleOCR's ``RecMetric`` default): the model
        often emits spurious leading/trailing spaces whose presence flips on tiny changes.
    """
    r, t = _texts(ref), _texts(test)
    if ignore_space:
        r, t = [a.replace(" ", "") for a in r], [b.replace(" ", "") for b in t]
    if len(r) != len(t):
        raise ValueError(f"{len(r)} reference samples but {len(t)} test samples")
    return 1.0 if not r else float(np.mean([a == b for a, b in zip(r, t, strict=True)]))


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def rec_char_accuracy(ref: Sequence[np.ndarray | str], test: Sequence[np.ndarray | str]
                      ) -> float:
    """Mean of ``1 - edit_distance / max(len(ref), len(test))`` over samples (PaddleOCR's
    ``norm_edit_dis``); two empty strings count as 1.0."""
    r, t = _texts(ref), _texts(test)
    if len(r) != len(t):
        raise ValueError(f"{len(r)} reference samples but {len(t)} test samples")
    if not r:
        return 1.0
    scores = [1.0 - edit_distance(a, b) / max(len(a), len(b), 1)
              for a, b in zip(r, t, strict=True)]
    return float(np.mean(scores))
