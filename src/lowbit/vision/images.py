"""Natural photos that ship inside installed packages, and seeded random crops of them: the
calibration and evaluation images for vision models when no dataset can be downloaded.

No ImageNet validation image ships anywhere, so vision models are measured by fidelity to the
float model (top-1 agreement, KL of the class distributions) on crops of real photos:
scikit-image's bundled data (astronaut, chelsea, coffee, rocket, ...), scikit-learn's china and
flower, matplotlib's grace_hopper, or any directory of the user's images.

A crop follows torchvision's RandomResizedCrop (aspect 3/4-4/3) over 25%-100% of the photo's area
(torchvision trains from 8%; evaluation crops keep the object large, as its centre crop does), resized
to 224 x 224 bilinearly, then normalised with ImageNet's mean and std: the distribution the
published classifiers were trained on.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import LowbitError

MIN_AREA = 0.25
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# scikit-image's natural colour/grey photos (its textures and synthetic images are left out)
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "motorcycle_right.png",
                  "hubble_deep_field.jpg", "retina.jpg", "camera.png", "brick.png", "grass.png", "gravel.png")


class ImageSourceError(LowbitError):
    pass


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    return None if spec is None or not spec.origin else Path(spec.origin).parent


def bundled_photos() -> list[Path]:
    """Every shipped photo found among the installed packages, in a fixed order."""
    found: list[Path] = []
    skimage = _package_dir("skimage")
    if skimage is not None:
        found += [skimage / "data" / n for n in SKIMAGE_PHOTOS if (skimage / "data" / n).is_file()]
    sklearn = _package_dir("sklearn")
    if sklearn is not None:
        found += [sklearn / "datasets" / "images" / n for n in ("china.jpg", "flower.jpg")
                  if (sklearn / "datasets" / "images" / n).is_file()]
    import matplotlib

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if hopper.is_file():
        found.append(hopper)
    return found


#: the bundled photos split in two disjoint halves (by position), so that calibration never sees an
#: evaluation photo: "photos-calib" the odd positions, "photos-eval" the even ones; "photos" all
PHOTO_SETS = ("photos", "photos-calib", "photos-eval")


def image_paths(source: str | Path | None = None) -> list[Path]:
    """A photo set (`PHOTO_SETS`; None: "photos"), a directory (its images, sorted) or an image file."""
    if source is None or str(source) in PHOTO_SETS:
        paths = bundled_photos()
        if len(paths) < 2:
            raise ImageSourceError("no bundled photos found (scikit-image, scikit-learn or matplotlib); pass a directory of images")
        return {"photos-calib": paths[1::2], "photos-eval": paths[0::2]}.get(str(source), paths)
    p = Path(source)
    if p.is_dir():
        paths = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not paths:
            raise ImageSourceError(f"{p} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    if p.is_file():
        return [p]
    raise ImageSourceError(f"{p} not found; pass a directory of images, an image file, or 'photos'")


def read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageSourceError(f"{path} cannot be read as an image: {exc}") from None


def _crop_box(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box: area MIN_AREA-100%, log-uniform aspect 3/4-4/3; a centre crop if 10 tries miss."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(MIN_AREA, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    return x, y, x + side, y + side


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image -> [3, H, W] float32 normalised with ImageNet's mean and std."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def random_crops(n: int, seed: int = 0, source: str | Path | None = None, size: int = 224) -> torch.Tensor:
    """[n, 3, size, size]: n seeded random resized crops, cycling through the images in order."""
    if n < 1:
        raise ImageSourceError(f"the number of crops must be at least 1, not {n}")
    images = [read_rgb(p) for p in image_paths(source)]
    rng = np.random.default_rng(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        im = images[i % len(images)]
        box = _crop_box(*im.size, rng)
        out[i] = to_tensor(im.resize((size, size), Image.BILINEAR, box=box))
    return out


def centre_crops(source: str | Path | None = None, size: int = 224) -> torch.Tensor:
    """[n_images, 3, size, size]: each image resized (shorter side size * 8/7) and centre-cropped,
    torchvision's evaluation transform."""
    out = []
    for p in image_paths(source):
        im = read_rgb(p)
        scale = size * 8 / 7 / min(im.size)
        w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
        im = im.resize((w, h), Image.BILINEAR)
        x, y = (w - size) // 2, (h - size) // 2
        out.append(to_tensor(im.crop((x, y, x + size, y + size))))
    return torch.stack(out)
