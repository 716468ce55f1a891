"""fer_model.faces on real photos: a face is found where it is and cut as FER2013 cut its faces; none is
found in a photo without one; a 48x48 crop is its own face."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fer_model import faces as F
from fer_model.inputs import ImageError, image_gray

DATA = Path(__file__).resolve().parents[1] / "data"
ASTRONAUT_FACE = (88, 41, 45, 44)  # by eye: the face's box in astronaut-256.jpg (x, y, w, h)


def _iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    w = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    h = max(0, min(ay + ah, by + bh) - max(ay, by))
    return w * h / (aw * ah + bw * bh - w * h)


def test_the_face_in_a_portrait_is_found_where_it_is():
    gray = image_gray((DATA / "astronaut-256.jpg").read_bytes(), draft_size=F.DETECT_SIDE)
    (face,) = F.detect(gray)
    assert _iou((face.x, face.y, face.w, face.h), ASTRONAUT_FACE) > 0.6 and face.score > 0


def test_a_photo_without_a_face_has_none_and_no_crop():
    gray = image_gray((DATA / "coffee-300.jpg").read_bytes(), draft_size=F.DETECT_SIDE)
    assert F.detect(gray) == [] and F.faces_of(gray) == []


def test_a_48x48_image_is_its_own_face_untouched():
    crop = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    ((face, same),) = F.faces_of(crop)
    assert (face.x, face.y, face.w, face.h) == (0, 0, 48, 48) and np.isnan(face.score)
    assert same is crop


def test_the_crop_has_fer2013s_margin_around_the_box():
    """A box on a ramp image: the crop spans CROP_SCALE x the box, centred CROP_SHIFT box heights above it."""
    ramp = np.tile(np.arange(400, dtype=np.float64), (400, 1))
    gray = np.round(ramp * 255 / 399).astype(np.uint8)  # grey level = x coordinate, scaled
    face = F.Face(100, 150, 100, 100)
    crop = F.crop(gray, face)
    side = 100 * F.CROP_SCALE
    left, right = 150 - side / 2, 150 + side / 2
    assert crop.shape == (48, 48)
    # The crop's first and last columns show the grey levels of x = left and x = right.
    assert crop[:, 0].mean() == pytest.approx(left * 255 / 399, abs=3)
    assert crop[:, -1].mean() == pytest.approx(right * 255 / 399, abs=3)
    vertical = np.tile(np.arange(400, dtype=np.float64)[:, None], (1, 400))
    top = F.crop(np.round(vertical * 255 / 399).astype(np.uint8), face)[0].mean() * 399 / 255
    assert top == pytest.approx(200 + F.CROP_SHIFT * 100 - side / 2, abs=3)


def test_a_face_at_the_border_is_padded_with_its_edge():
    gray = np.full((100, 100), 200, np.uint8)
    crop = F.crop(gray, F.Face(-20, -20, 60, 60))  # half outside the photo
    assert crop.shape == (48, 48) and (crop == 200).all()


def test_a_batch_keeps_rows_and_counts_those_without_a_face():
    photos = [(DATA / "astronaut-256.jpg").read_bytes(), (DATA / "coffee-300.jpg").read_bytes(),
              np.zeros((48, 48), np.uint8)]
    batch = F.face_batch(photos)
    assert batch.rows == [0, 2] and batch.no_face == [1] and batch.crops.shape == (2, 48, 48)
    assert tuple(batch.images.shape) == (2, 1, 48, 48)
    whole = F.face_batch(photos, whole_image=True)
    assert whole.rows == [0, 1, 2] and whole.no_face == []
    with pytest.raises(ImageError, match="^row 1: "):
        F.face_batch([photos[0], b"not an image"])
