"""Faces in photos: find them, and cut each as FER2013 cut its faces, so the network sees what it learned on.

A 48x48 grayscale image is taken as a FER2013 crop already (the whole image is the face): every test-set
figure stays as it was. Any other image goes through a face detector, and each face found becomes one
48x48 crop.

The detector is dlib's HOG + linear SVM frontal-face detector (`dlib.get_frontal_face_detector`, from the
`dlib-bin` wheel: its model is compiled into the library, no weights file to fetch). Chosen over OpenCV's
Haar cascades by `benchmarks/face_detectors.py` (its figures: docs/results.md): more of FER2013's own faces
found, at a similar speed, from a 4 MB wheel against OpenCV's 62 MB (whose 5.x wheels no longer ship the
cascades).

The crop: on 400 FER2013 test faces, FER2013's crop is 1.11 times the side of the HOG box (median; quartiles
1.11-1.32) and centred 0.09 box heights above its centre: `CROP_SCALE`, `CROP_SHIFT`. Parts of a crop
outside the photo are filled by repeating its edge pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fer_model.config import IMAGE_SIZE

CROP_SCALE = 1.11  # a FER2013 crop's side / the HOG box's side (median over 400 test faces)
CROP_SHIFT = -0.09  # the crop's centre minus the box's centre, in box heights (up is negative)
# Detection runs on the photo scaled so its longer side is at most this (boxes are mapped back): bounds
# its time (~70 ms at 512x512 here) whatever the photo's size; with one upsampling, faces of ~40 px of it
# and up are found (HOG's window is 80 px).
DETECT_SIDE = 640
UPSAMPLE = 1
MAX_FACES = 32  # per image, the highest-scoring: bounds one image's cost (a crowd photo)


@dataclass(frozen=True)
class Face:
    """A face in a photo: its box in the photo's pixels (x, y: top-left) and the detector's score
    (NaN for a whole-image 48x48 crop, which was not detected; the served model says -1)."""

    x: int
    y: int
    w: int
    h: int
    score: float = math.nan


def is_crop(gray: np.ndarray) -> bool:
    """Whether an image is already what the network sees (a FER2013-style 48x48 crop)."""
    return gray.shape == (IMAGE_SIZE, IMAGE_SIZE)


_DETECTOR = None


def _detector():
    """dlib's detector, made once per process (its construction takes ~0.1 s); safe to share across threads."""
    global _DETECTOR
    if _DETECTOR is None:
        import dlib  # here: only photos need it (a 48x48 crop never does)

        _DETECTOR = dlib.get_frontal_face_detector()
    return _DETECTOR


def detect(gray: np.ndarray) -> list[Face]:
    """The faces in a uint8 (H, W) grayscale photo, highest score first (at most `MAX_FACES`)."""
    from PIL import Image

    h, w = gray.shape
    scale = min(1.0, DETECT_SIDE / max(h, w))
    small = gray if scale == 1.0 else np.asarray(
        Image.fromarray(gray).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR))
    boxes, scores, _ = _detector().run(np.ascontiguousarray(small), UPSAMPLE, 0.0)
    faces = [Face(round(b.left() / scale), round(b.top() / scale), round(b.width() / scale), round(b.height() / scale),
                  float(s)) for b, s in zip(boxes, scores)]
    return sorted(faces, key=lambda f: -f.score)[:MAX_FACES]


def crop(gray: np.ndarray, face: Face) -> np.ndarray:
    """The 48x48 uint8 crop of `face`, with FER2013's margin (`CROP_SCALE`, `CROP_SHIFT`), bilinear."""
    from PIL import Image

    side = max(face.w, face.h) * CROP_SCALE
    cx, cy = face.x + face.w / 2, face.y + face.h / 2 + CROP_SHIFT * face.h
    left, top = round(cx - side / 2), round(cy - side / 2)
    size = max(1, round(side))
    h, w = gray.shape
    # Edge pixels repeated where the crop leaves the photo (a face at its border).
    rows = np.clip(np.arange(top, top + size), 0, h - 1)
    cols = np.clip(np.arange(left, left + size), 0, w - 1)
    patch = gray[np.ix_(rows, cols)]
    return np.asarray(Image.fromarray(patch).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)


def faces_of(gray: np.ndarray) -> list[tuple[Face, np.ndarray]]:
    """Each face of an image with its 48x48 crop: a 48x48 image is its own one face; else the detected
    ones (none: an empty list, never a guess)."""
    if is_crop(gray):
        return [(Face(0, 0, IMAGE_SIZE, IMAGE_SIZE), gray)]
    return [(face, crop(gray, face)) for face in detect(gray)]


@dataclass
class FaceBatch:
    """The faces of a batch of images: one 48x48 crop per face, the input row and box of each, and the
    rows in which no face was found."""

    crops: np.ndarray  # uint8 (M, 48, 48)
    rows: list[int]  # the input row of each crop
    faces: list[Face]  # its box in that image
    no_face: list[int]  # input rows with no face

    @property
    def images(self):
        """The crops as the network's uint8 (M, 1, 48, 48) batch."""
        import torch

        return torch.from_numpy(self.crops[:, None].copy())


def face_batch(values, whole_image: bool = False, before_each: Callable[[], None] | None = None) -> FaceBatch:
    """The faces of images as users hold them (bytes, arrays: `fer_model.inputs.image_gray`). With
    `whole_image`, every image is taken as one face (resized whole, as before faces were looked for).
    A value that is not an image raises ImageError naming its row (``row 1: not a readable image``).
    `before_each` runs before each image is decoded (the served model's deadline check)."""
    from fer_model.inputs import ImageError, image_array, image_gray

    crops, rows, faces, no_face = [], [], [], []
    for i, value in enumerate(values):
        if before_each is not None:
            before_each()
        try:
            if whole_image:
                found = [(Face(0, 0, IMAGE_SIZE, IMAGE_SIZE), image_array(value))]
            else:
                found = faces_of(image_gray(value, draft_size=DETECT_SIDE))
        except ImageError as exc:
            raise ImageError(f"row {i}: {exc}") from None
        if not found:
            no_face.append(i)
        for face, crop48 in found:
            crops.append(crop48)
            rows.append(i)
            faces.append(face)
    stacked = np.stack(crops) if crops else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    return FaceBatch(stacked, rows, faces, no_face)
