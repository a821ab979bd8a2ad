"""Tests of tvmquant.datasets: deterministic real data, disjoint splits, layouts and metrics."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

pytest.importorskip("rapidocr_onnxruntime")
pytest.importorskip("skimage")
pytest.importorskip("shapely")
pytest.importorskip("pyclipper")

from tvmquant import datasets as ds


def _digest(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a).tobytes() + str(a.shape).encode()).hexdigest()


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------


def test_split_is_deterministic():
    cached = ds._build_split("eval")
    fresh = ds._build_split.__wrapped__("eval")
    assert len(fresh.pages) == len(cached.pages)
    assert len(fresh.lines) == len(cached.lines)
    for a, b in zip(fresh.pages, cached.pages, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(fresh.lines, cached.lines, strict=True):
        assert (a.text, a.source) == (b.text, b.source)
        np.testing.assert_array_equal(a.image, b.image)


def test_scanned_crops_are_deterministic():
    again = ds._scanned_lines.__wrapped__("page")
    cached = ds._scanned_lines("page")
    assert len(again) == len(cached) > 0
    for a, b in zip(again, cached, strict=True):
        np.testing.assert_array_equal(a, b)


def test_splits_are_disjoint():
    for getter in (lambda s: ds.det_pages(s), lambda s: [t.image for t in ds.text_lines(s)],
                   lambda s: ds.rec_inputs(320, s), lambda s: ds.cls_inputs(s),
                   lambda s: ds.det_inputs((320, 320), s)):
        calib = {_digest(a) for a in getter("calib")}
        evals = {_digest(a) for a in getter("eval")}
        assert calib and evals
        assert not calib & evals


def test_sources_and_sizes():
    lines = ds.text_lines("eval")
    sources = {t.source for t in lines}
    assert {"rendered", "scanned:page"} <= sources
    assert all((t.text is None) == t.source.startswith("scanned") for t in lines)
    assert len(ds.rec_inputs(split="eval")) >= 100
    assert len(ds.cls_inputs(split="eval")) >= 100
    assert len(ds.det_inputs(split="eval")) >= 8
    assert len(ds.det_inputs(split="calib")) >= 32  # the benchmark's default --n-calib


@pytest.mark.parametrize("size", [(320, 320), (640, 640), (320, 640)])
def test_det_inputs_layout(size):
    xs = ds.det_inputs(size, "eval", n=3)
    assert len(xs) == 3
    for x in xs:
        assert x.shape == (1, 3, *size) and x.dtype == np.float32
        assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6


def test_rec_and_cls_inputs_layout():
    for width in (320, 160):
        for x in ds.rec_inputs(width, "calib", n=5):
            assert x.shape == (1, 3, 48, width) and x.dtype == np.float32
    for x in ds.cls_inputs("calib", n=6):
        assert x.shape == (1, 3, 48, 192) and x.dtype == np.float32


def test_prefixes_labels_and_rotation():
    full = ds.rec_inputs(320, "eval")
    head = ds.rec_inputs(320, "eval", n=7)
    for a, b in zip(head, full[:7], strict=True):
        np.testing.assert_array_equal(a, b)
    labels = ds.cls_labels("eval")
    assert labels[:6] == [0, 1, 0, 1, 0, 1]
    assert len(labels) == len(ds.cls_inputs("eval")) == 2 * len(ds.text_lines("eval"))
    # The 180-degree copy of line i is input 2i+1.
    cls = ds.cls_inputs("eval", n=2)
    upright = ds._cls_resize_norm(ds.text_lines("eval", 1)[0].image)
    np.testing.assert_array_equal(cls[0][0], upright)
    assert not np.array_equal(cls[0], cls[1])
    assert ds.rec_labels("eval", 3) == [t.text for t in ds.text_lines("eval", 3)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ds.rec_inputs(split="train")
    with pytest.raises(ValueError, match="only"):
        ds.det_inputs(split="eval", n=10_000)
    with pytest.raises(ValueError, match="multiples of 32"):
        ds.det_inputs((300, 300))
    with pytest.raises(ValueError, match="kind"):
        ds.model_inputs("ocr")


@pytest.mark.parametrize("kind,kwargs,shape", [
    ("cls", {}, (1, 3, 48, 192)),
    ("rec", {"rec_width": 320}, (1, 3, 48, 320)),
    ("det", {"det_size": (320, 320)}, (1, 3, 320, 320)),
])
def test_calibration_npz(tmp_path, kind, kwargs, shape):
    path = ds.calibration_npz(kind, tmp_path / "sub" / f"{kind}.npz", n=3, **kwargs)
    assert path == tmp_path / "sub" / f"{kind}.npz"
    assert sorted(p.name for p in path.parent.iterdir()) == [f"{kind}.npz"]  # no temp left
    with np.load(path) as f:
        assert list(f.keys()) == [ds.INPUT_NAME] == ["x"]
        x = f["x"]
    assert x.shape == (3, *shape) and x.dtype == np.float32
    expected = ds.model_inputs(kind, "calib", 3, **kwargs)
    np.testing.assert_array_equal(x, np.stack(expected))
    samples = ds.calibration_samples(kind, 2, **kwargs)
    assert [list(s) for s in samples] == [["x"], ["x"]]
    np.testing.assert_array_equal(samples[1]["x"], expected[1])


def test_fp32_models_read_the_data():
    """The pre-processing matches the models: FP32 cls and rec mostly get the truth right."""
    ort = pytest.importorskip("onnxruntime")
    from tvmquant.zoo import ppocr_model_path

    def session(kind):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        return ort.InferenceSession(str(ppocr_model_path(kind)), opts,
                                    providers=["CPUExecutionProvider"])

    cls = session("cls")
    probs = [cls.run(None, {"x": x})[0] for x in ds.cls_inputs("eval", n=60)]
    assert np.mean(np.concatenate(probs).argmax(-1) == ds.cls_labels("eval", 60)) >= 0.9

    rec = session("rec")
    n = 16
    texts = [ds.rec_text(rec.run(None, {"x": x})[0]) for x in ds.rec_inputs(320, "eval", n)]
    pairs = [(gt, t) for gt, t in zip(ds.rec_labels("eval", n), texts, strict=True) if gt]
    assert len(pairs) >= 8
    assert ds.rec_char_accuracy([g for g, _ in pairs], [t for _, t in pairs]) >= 0.85

    det = session("det")
    maps = [det.run(None, {"x": x})[0] for x in ds.det_inputs((320, 320), "eval", n=2)]
    assert maps[0].shape == (1, 1, 320, 320)
    assert all(len(ds.det_boxes(m)) >= 3 for m in maps)


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def test_cls_agreement():
    ref = [np.array([[0.9, 0.1]]), np.array([[0.2, 0.8]])]
    assert ds.cls_agreement(ref, ref) == 1.0
    test = [np.array([[0.6, 0.4]]), np.array([[0.7, 0.3]])]
    assert ds.cls_agreement(ref, test) == 0.5
    assert ds.cls_agreement(np.concatenate(ref), np.concatenate(test)) == 0.5
    with pytest.raises(ValueError):
        ds.cls_agreement(ref, ref[:1])


def _rect_map(rects, shape=(64, 96), value=0.95):
    m = np.zeros((1, 1, *shape), np.float32)
    for y0, y1, x0, x1 in rects:
        m[0, 0, y0:y1, x0:x1] = value
    return m


def test_det_mask_iou():
    a = _rect_map([(0, 10, 0, 10)])
    b = _rect_map([(0, 10, 5, 15)])
    assert ds.det_mask_iou(a, a) == 1.0
    assert ds.det_mask_iou(a, b) == pytest.approx(50 / 150)
    empty = _rect_map([])
    assert ds.det_mask_iou(empty, empty) == 1.0
    assert ds.det_mask_iou(a, empty) == 0.0
    # Threshold: values at or below thresh are background.
    assert ds.det_mask_iou(a, _rect_map([(0, 10, 0, 10)], value=0.3)) == 0.0
    # Pooled over pages: (100 + 50) / (100 + 150).
    assert ds.det_mask_iou([a, a], [a, b]) == pytest.approx(150 / 250)


def test_polygon_iou():
    sq = np.array([[0, 0], [2, 0], [2, 2], [0, 2]])
    assert ds.polygon_iou(sq, sq) == pytest.approx(1.0)
    assert ds.polygon_iou(sq, sq + np.array([1, 0])) == pytest.approx(2 / 6)
    assert ds.polygon_iou(sq, sq + np.array([5, 5])) == 0.0


def test_det_box_agreement():
    two = _rect_map([(8, 20, 6, 60), (36, 50, 10, 80)])
    boxes = ds.det_boxes(two)
    assert boxes.shape == (2, 4, 2) and boxes.dtype == np.int32
    assert ds.det_box_agreement(two, two) == 1.0
    assert ds.det_box_agreement(two, _rect_map([(8, 20, 6, 60)])) == 0.5
    # A one-pixel shift of large boxes keeps IoU >= 0.9; a large one does not.
    assert ds.det_box_agreement(two, _rect_map([(8, 20, 7, 61), (36, 50, 11, 81)])) == 1.0
    assert ds.det_box_agreement(two, _rect_map([(8, 20, 30, 84), (36, 50, 10, 80)])) == 0.5
    empty = _rect_map([])
    assert ds.det_box_agreement(empty, empty) == 1.0
    assert ds.det_box_agreement(empty, two) == 0.0
    assert ds.det_box_agreement([two, two], [two, empty]) == 0.5


def _ctc_probs(tokens, noise_seed=0):
    chars = ds.rec_character_list()
    index = {c: i for i, c in enumerate(chars)}
    rng = np.random.default_rng(noise_seed)
    p = rng.uniform(0, 0.1, (len(tokens), len(chars))).astype(np.float32)
    for t, tok in enumerate(tokens):
        p[t, index[tok]] = 1.0
    return (p / p.sum(-1, keepdims=True))[np.newaxis]


def test_ctc_dictionary():
    chars = ds.rec_character_list()
    assert len(chars) == 6625
    assert chars[0] == "blank" and chars[-1] == " "
    assert {"a", "Z", "7", "$", "%"} <= set(chars)


def test_rec_text_ctc_decode():
    b = "blank"
    tokens = [b, "H", "H", b, "e", "l", "l", b, "l", "o", "o", " ", " ", "4", b, "2", "2", b]
    probs = _ctc_probs(tokens)
    assert probs.shape == (1, len(tokens), 6625)
    assert ds.rec_text(probs) == "Hello 42"
    assert ds.rec_text(probs[0]) == "Hello 42"
    assert ds.rec_text(_ctc_probs([b, b, b])) == ""
    batch = np.concatenate([probs, _ctc_probs(["a", b, "a", "a"] + [b] * 14)])
    assert ds.rec_texts(batch) == ["Hello 42", "aa"]
    with pytest.raises(ValueError, match="one sample"):
        ds.rec_text(batch)
    with pytest.raises(ValueError, match="classes"):
        ds.rec_text(np.zeros((1, 4, 10), np.float32))


def test_rec_agreement_and_char_accuracy():
    ref = [_ctc_probs(["a", "b"]), _ctc_probs(["c", "blank"])]
    assert ds.rec_agreement(ref, ref) == 1.0
    assert ds.rec_char_accuracy(ref, ref) == 1.0
    assert ds.rec_agreement(["ab", "cd"], ["ab", "cx"]) == 0.5
    assert ds.rec_agreement([" ab "], ["ab"]) == 0.0
    assert ds.rec_agreement([" ab "], ["ab"], ignore_space=True) == 1.0
    assert ds.rec_char_accuracy(["abcd"], ["abxd"]) == pytest.approx(0.75)
    assert ds.rec_char_accuracy(["abcd", ""], ["ab", ""]) == pytest.approx((0.5 + 1.0) / 2)
    assert ds.edit_distance("kitten", "sitting") == 3
    assert ds.edit_distance("", "abc") == 3
    with pytest.raises(ValueError):
        ds.rec_agreement(["a"], ["a", "b"])
