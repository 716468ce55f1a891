"""`python -m tuning.predict`: emotions of image files, folders, or a FER2013 source, from a registered model.

    python -m tuning.predict face1.png faces/                      # the champion: models:/fer2013-cnn@champion
    python -m tuning.predict test.csv --model models:/fer2013-cnn/3 --format csv --out predictions.csv
    python -m tuning.predict ../shared/data/fer2013/fer2013-msambare.tar.gz   # its test images, with accuracy

A FER2013 source (a .csv, .zip, .tar.gz, or a folder with train/ and test/ or the CSV) is read by the
data layer; its test images (PublicTest and PrivateTest) are predicted and scored against their labels.
A folder with test/<class>/ images and no train/ is labelled test images too, class folders mapped by
name as the data layer maps them. Anything else is image files (folders recursively). Unreadable files
and images beyond `fer_model.inputs.MAX_PIXELS` are skipped and counted; the rest are predicted in
requests of at most `tuning.pyfunc.MAX_IMAGES` images.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from fer_model.cli import Parser, run_cli
from fer_model.config import CLASS_NAMES
from fer_model.errors import ConfigError, UserError, first_line
from tuning import options

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)
DEFAULT_MODEL = "models:/fer2013-cnn@champion"
_SOURCE_SUFFIXES = (".csv", ".csv.gz", ".zip", ".tar.gz", ".tgz", ".tar")
_CSV_NAMES = {"fer2013.csv", "icml_face_data.csv", "fer2013.csv.gz"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def build_parser() -> Parser:
    p = Parser(prog="python -m tuning.predict", description="Predict emotions with a registered model.")
    p.add_argument("paths", nargs="+", help="image files, folders (recursively), or one FER2013 source")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model URI (default {DEFAULT_MODEL})")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format (default table)")
    p.add_argument("--top-k", type=int, default=1, help="emotions per image, most likely first (default 1)")
    p.add_argument("--out", help="write the predictions here instead of standard output")
    p.add_argument("--cache-dir", help="decoded-data cache for a FER2013 source (default $FER2013_CACHE or ~/.cache/fer2013)")
    p.add_argument("--annotate", metavar="DIR",
                   help="also write each input image to DIR with its faces' boxes and emotions drawn on it")
    p.add_argument("--whole-image", action="store_true",
                   help="take each image whole as one face (resized to 48x48) instead of looking for faces; "
                        "a 48x48 image always is, and labelled test data (a FER2013 source, a test/<class>/ folder) too")
    options.add_tracking_flags(p, model_name=False, experiment=False)
    return p


def is_fer_source(path: Path) -> bool:
    name = path.name.lower()
    if path.is_file():
        return name.endswith(_SOURCE_SUFFIXES)
    children = {c.name.lower() for c in path.iterdir()} if path.is_dir() else set()
    return bool(children & {"train", "test", *_CSV_NAMES})


def _child(folder: Path, name: str) -> Path | None:
    """The entry of `folder` named `name` in any case (the data layer reads TEST/ as test/), or None."""
    return next((c for c in folder.iterdir() if c.name.lower() == name), None)


def is_test_folder(path: Path) -> bool:
    """Whether `path` is a folder of labelled test images only: test/ but neither train/ nor a CSV."""
    if not path.is_dir():
        return False
    children = {c.name.lower() for c in path.iterdir()}
    return "test" in children and not children & {"train", *_CSV_NAMES}


def read_test_folder(root: Path) -> tuple[list[str], list[bytes], "np.ndarray", "np.ndarray"]:
    """(names, raw 48x48 bytes, labels, usage) of the images under ``root/test/<class>/``, decoded as
    `read_images` decodes (unreadable ones skipped), placed by the data layer's rule (`_place`: class
    folders by name, PublicTest/PrivateTest by file-name prefix) so scores match a full source's."""
    import numpy as np

    from fer_model import sources as fsources

    test = _child(root, "test")
    placed = {}
    for f in image_files([test]):
        place = fsources._place(f.relative_to(root).as_posix())  # DataError naming an unknown class folder
        if place is not None:
            placed[str(f)] = place
    names, blobs = read_images([Path(n) for n in placed])
    labels = np.array([placed[n][0] for n in names], dtype=np.int64)
    usage = np.array([placed[n][1] for n in names], dtype=np.int8)
    return names, blobs, labels, usage


def image_files(paths: Sequence[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        else:
            files.append(path)
    return files


def read_images(files: Sequence[Path]) -> tuple[list[str], list[bytes]]:
    """The readable files' bytes, as the model takes them (it finds the faces); a file that is not an image,
    or is over the pixel limit, is skipped, with one warning that names a few."""
    from fer_model.inputs import ImageError, image_gray

    names, blobs, bad = [], [], []
    for f in files:
        try:
            data = f.read_bytes()
            image_gray(data)  # refused here as the model would refuse it, so the others still get predicted
        except (OSError, ImageError) as exc:
            bad.append(f"{f} ({first_line(exc)})")
            continue
        names.append(str(f))
        blobs.append(data)
    if bad:
        log.warning("skipped %d unreadable file(s): %s%s", len(bad), "; ".join(bad[:3]), " ..." if len(bad) > 3 else "")
    return names, blobs


def load_model(uri: str, tracking_uri: str):
    import mlflow
    import mlflow.pyfunc

    # models:/ URIs resolve through the process-wide tracking URI (the registry follows it).
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 - MlflowException for unknown names, versions, aliases
        hint = ("promote one with python -m tuning.promote (after python -m tuning.grid)" if "@" in uri
                else "see the registered models in the MLflow UI")
        raise UserError(f"cannot load model {uri} from {tracking_uri}: {first_line(exc)}; {hint}") from None



def render(rows: list[dict], fmt: str, top_k: int) -> str:
    """A row per face (``face``: its box x,y,w,h; None where the input had no face) as a table, CSV or JSON."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    head = ["input", "face", "emotion", "probability"] + ([f"top{k}" for k in range(2, top_k + 1)])
    lines = []
    for r in rows:
        top, box = r["top"], ",".join(map(str, r["face"])) if r["face"] else "-"
        first = [top[0][0], f"{top[0][1]:.4f}"] if top else [r["emotion"], ""]
        lines.append([r["input"], box, *first, *[f"{e} {p:.4f}" for e, p in top[1:]]])
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(head + (["label"] if rows and "label" in rows[0] else []))
        for r, cells in zip(rows, lines):
            w.writerow(cells + ([r["label"]] if "label" in r else []))
        return buf.getvalue().rstrip("\n")
    width = max([len(c[0]) for c in lines] + [5])
    boxes = max([len(c[1]) for c in lines] + [4])
    out = [f"{'input':<{width}}  {'face':<{boxes}}  {'emotion':<9} {'p':>6}" + ("  next" if top_k > 1 else "")]
    out += [f"{c[0]:<{width}}  {c[1]:<{boxes}}  {c[2]:<9} {c[3]:>6}" + ("  " + ", ".join(c[4:]) if c[4:] else "")
            for c in lines]
    return "\n".join(out)


def annotate(folder: Path, names: list[str], blobs: list[bytes], frame) -> list[Path]:
    """Each input image as a PNG in `folder` with its faces' boxes and emotions drawn (red: no face found)."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    from tuning.registry.pyfunc import BOX_COLUMNS, EMOTION, FACE_FOUND, PROB_COLUMNS, ROW

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (name, blob) in enumerate(zip(names, blobs)):
        faces = frame[frame[ROW] == i]
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(blob))).convert("RGB")
        except Exception:  # noqa: BLE001 - raw 48x48 grey levels (a FER2013 source's rows)
            image = Image.frombytes("L", (48, 48), blob).convert("RGB")
        scale = max(1, 384 // max(image.size))  # a 48x48 crop drawn large enough to read
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        draw, line = ImageDraw.Draw(image), max(2, max(image.size) // 200)
        font = ImageFont.load_default(size=max(12, max(image.size) // 28))

        def label(x: int, y: int, text: str, colour: tuple[int, int, int]) -> None:
            """`text` on a filled box of `colour`, above (x, y) where there is room, else below it."""
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            y = y - (bottom - top) - 2 * line if y - (bottom - top) - 2 * line >= 0 else y + line
            draw.rectangle([x, y, x + right - left + 2 * line, y + bottom - top + 2 * line], fill=colour)
            draw.text((x + line - left, y + line - top), text, fill=(0, 0, 0), font=font)

        for _, f in faces.iterrows():
            if not f[FACE_FOUND]:
                label(0, 0, "no face found", (255, 90, 90))
                continue
            x, y, w, h = (int(f[k]) * scale for k in BOX_COLUMNS)
            if (w, h) == (48 * scale, 48 * scale) and image.size != (w, h):  # a whole-image row: the image's own box
                x, y, w, h = 0, 0, image.width, image.height
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(60, 230, 60), width=line)
            label(x, y, f"{f[EMOTION]} {max(float(f[c]) for c in PROB_COLUMNS):.2f}", (60, 230, 60))
        out = folder / f"{i:04d}-{Path(name).stem[:60]}.png"
        image.save(out)
        written.append(out)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1 or args.top_k > len(CLASS_NAMES):
        raise ConfigError(f"--top-k must be within 1..{len(CLASS_NAMES)}, got {args.top_k}")
    paths = [Path(p).expanduser() for p in args.paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"no such file or folder: {', '.join(missing)}")
    sources = [p for p in paths if is_fer_source(p)]
    if sources and len(paths) > 1:
        raise ConfigError(f"a FER2013 source ({sources[0]}) is predicted on its own: pass it alone")
    if args.out and (Path(args.out).is_dir() or not Path(args.out).expanduser().resolve().parent.is_dir()):
        raise UserError(f"--out {args.out}: not a file in an existing folder")
    tracking_uri = options.resolve_tracking_uri(args.tracking_uri)
    options.check_tracking(tracking_uri)

    import numpy as np
    import pandas as pd

    from tuning.registry.pyfunc import BOX_COLUMNS, EMOTION, FACE_FOUND, IMAGE_COLUMN, MAX_IMAGES, PROB_COLUMNS, ROW

    labels = usage = None
    if sources and is_test_folder(sources[0]):
        names, blobs, labels, usage = read_test_folder(sources[0])
    elif sources:
        from fer_model import cache as fcache
        from fer_model import sources as fsources

        raw, _ = fcache.read_cached(sources[0], args.cache_dir)
        test = np.isin(raw.usage, [fsources.PUBLIC_TEST, fsources.PRIVATE_TEST, fsources.TEST_UNKNOWN_HALF])
        images, labels, usage = raw.images[test], raw.labels[test], raw.usage[test]
        names = [f"{sources[0].name}#{i}" for i in np.flatnonzero(test)]
        blobs = [img.tobytes() for img in images]  # raw 48x48 grey levels: the model's other input form
    else:
        names, blobs = read_images(image_files(paths))
    if not blobs:
        raise UserError("no readable images to predict")
    if args.annotate and Path(args.annotate).exists() and not Path(args.annotate).is_dir():
        raise UserError(f"--annotate {args.annotate}: not a folder")
    model = load_model(args.model, tracking_uri)
    # Labelled test data is FER2013's crops: each image is its face (one row per input, in order).
    params = {"whole_image": True} if labels is not None or args.whole_image else None
    try:
        # The model refuses requests of more than MAX_IMAGES images; a FER2013 test set holds 7,178.
        parts = []
        for i in range(0, len(blobs), MAX_IMAGES):
            part = model.predict(pd.DataFrame({IMAGE_COLUMN: blobs[i:i + MAX_IMAGES]}), params=params)
            part[ROW] += i
            parts.append(part)
        frame = pd.concat(parts, ignore_index=True)
        probs = frame[PROB_COLUMNS].to_numpy()
    except Exception as exc:  # noqa: BLE001 - a model that is not this project's image pyfunc
        raise UserError(f"model {args.model} does not take an {IMAGE_COLUMN!r} column and return a row per face "
                        f"({ROW}, {', '.join(PROB_COLUMNS[:2])}, ...): {first_line(exc)}") from None
    order = np.argsort(-np.nan_to_num(probs, nan=-1.0), axis=1)[:, :args.top_k]
    rows = []
    for k, f in enumerate(frame.itertuples(index=False)):
        i, found = int(getattr(f, ROW)), bool(getattr(f, FACE_FOUND))
        row = {"input": names[i], "face": [int(getattr(f, c)) for c in BOX_COLUMNS] if found else None,
               "emotion": getattr(f, EMOTION), "top": [(CLASS_NAMES[j], float(probs[k, j])) for j in order[k]] if found else []}
        if labels is not None:
            row["label"] = CLASS_NAMES[int(labels[i])]
        rows.append(row)
    text = render(rows, args.format, args.top_k)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"{len(rows)} predictions written to {args.out}")
    else:
        print(text)
    sys.stdout.flush()  # the table first, then what is said about it (on stderr: csv and json stay parseable)
    without = sum(r["face"] is None for r in rows)
    if without:
        print(f"{without} of {len(blobs)} image(s): no face found (a row each, emotion 'no face'; --whole-image "
              "takes each image whole)", file=sys.stderr)
    if args.annotate:
        written = annotate(Path(args.annotate), names, blobs, frame)
        print(f"{len(written)} annotated image(s) written to {args.annotate}", file=sys.stderr)
    if labels is not None:
        from fer_model.evaluate import describe_test, evaluate_probabilities

        ev = evaluate_probabilities(probs, labels.astype(np.int64), usage)
        stream = sys.stderr if args.format != "table" and not args.out else sys.stdout  # keep csv/json output parseable
        print(f"\n{len(rows)} labelled test images: {describe_test(ev.metrics)}\n{ev.report_text}", file=stream)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
