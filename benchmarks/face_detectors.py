"""Which face detector finds FER2013's faces, how fast: dlib's HOG (what `fer_model.faces` uses) against
OpenCV's Haar cascades, on real photos and on real FER2013 test faces set into larger scenes.

    pip install opencv-python-headless==4.14.0.94   # the Haar side only (5.x no longer ships the cascades)
    python benchmarks/face_detectors.py --data PATH [--faces 400] [--photos DIR]

Prints, per detector: faces found of the FER2013 test faces (each upscaled 3x to 144 px and placed at a
random spot of a 320x320 mid-grey scene), boxes found elsewhere, milliseconds a scene; the boxes and time
on each photo of --photos (default: the test photos under tests/data); and the crop margin FER2013 has
around a HOG box (what `fer_model.faces.CROP_SCALE`/`CROP_SHIFT` are set from).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_flags  # noqa: E402
from fer_model import faces as F  # noqa: E402
from fer_model.config import DataConfig  # noqa: E402
from fer_model.data import load  # noqa: E402
from fer_model.inputs import image_gray  # noqa: E402


def detectors() -> dict:
    """name -> f(gray) -> list of (x, y, w, h)."""
    import dlib

    hog = dlib.get_frontal_face_detector()
    out = {"dlib HOG (upsample 1)": lambda g: [(b.left(), b.top(), b.width(), b.height()) for b in hog(g, F.UPSAMPLE)]}
    try:
        import cv2

        for name in ("default", "alt2"):
            cascade = cv2.CascadeClassifier(cv2.data.haarcascades + f"haarcascade_frontalface_{name}.xml")
            out[f"OpenCV {cv2.__version__} Haar {name}"] = (
                lambda g, c=cascade: [tuple(int(v) for v in b) for b in c.detectMultiScale(g, 1.1, 5, minSize=(24, 24))])
    except ImportError:
        print("(opencv-python-headless not installed: the Haar cascades are left out)")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="FER2013 source (the test faces come from its test split)")
    p.add_argument("--faces", type=int, default=400)
    p.add_argument("--photos", default=str(ROOT / "tests" / "data"))
    args = p.parse_args()
    print("machine:", cpu_flags())
    from PIL import Image

    faces = load(DataConfig(args.data), progress=False).test.images[: args.faces, 0].numpy()
    rng = np.random.default_rng(0)
    scenes = []
    for f in faces:
        canvas = np.full((320, 320), 128, np.uint8)
        x, y = (int(v) for v in rng.integers(0, 176, 2))
        canvas[y:y + 144, x:x + 144] = np.asarray(Image.fromarray(f).resize((144, 144), Image.Resampling.BICUBIC))
        scenes.append((canvas, x + 72, y + 72))
    photos = sorted(Path(args.photos).glob("*.jpg")) + sorted(Path(args.photos).glob("*.png"))
    print(f"\n{len(faces)} FER2013 test faces in 320x320 scenes; photos: {', '.join(p.name for p in photos)}")
    print(f"{'detector':<32} {'found':>12} {'elsewhere':>9} {'ms/scene':>9}  photos (boxes, ms)")
    for name, find in detectors().items():
        found = elsewhere = 0
        t0 = time.perf_counter()
        for img, cx, cy in scenes:
            boxes = find(img)
            hit = [b for b in boxes if abs(b[0] + b[2] / 2 - cx) < 40 and abs(b[1] + b[3] / 2 - cy) < 40]
            found += bool(hit)
            elsewhere += len(boxes) - len(hit)
        ms = 1000 * (time.perf_counter() - t0) / len(scenes)
        seen = []
        for photo in photos:
            gray = image_gray(photo.read_bytes(), draft_size=F.DETECT_SIDE)
            t = time.perf_counter()
            boxes = find(gray)
            seen.append(f"{photo.stem} {gray.shape[1]}x{gray.shape[0]}: {boxes or 'none'} {1000 * (time.perf_counter() - t):.0f} ms")
        print(f"{name:<32} {found:>5}/{len(scenes)} ({100 * found / len(scenes):4.1f}%) {elsewhere:>9} {ms:>9.1f}  "
              + "; ".join(seen))
    import dlib

    hog = dlib.get_frontal_face_detector()
    ratio, shift = [], []
    for f in faces:
        canvas = np.full((320, 320), 128, np.uint8)
        canvas[88:232, 88:232] = np.asarray(Image.fromarray(f).resize((144, 144), Image.Resampling.BICUBIC))
        for b in hog(canvas, F.UPSAMPLE):
            ratio.append(144 / b.width())
            shift.append((160 - (b.top() + b.height() / 2)) / b.height())
    print(f"\nFER2013's crop around a HOG box (n={len(ratio)}): side {np.median(ratio):.2f}x the box's (quartiles "
          f"{np.percentile(ratio, 25):.2f}-{np.percentile(ratio, 75):.2f}), centre {np.median(shift):+.2f} box heights "
          f"from its centre; fer_model.faces uses {F.CROP_SCALE} and {F.CROP_SHIFT:+}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
