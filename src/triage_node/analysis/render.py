"""The heatmap picture: the windowed radiograph with the class-activation map laid over it.

Pixels only, no DICOM: the Secondary Capture that carries it is made in
:mod:`triage_node.results`.
The picture holds no patient text: only the colour legend and the words "AI HEATMAP - NOT FOR
DIAGNOSTIC USE", so it cannot be mistaken for the image itself.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from triage_node.analysis.preprocess import Geometry

MAX_SIDE = 1024  # heatmaps are a guide, not an image to read: keep them light to send and store
LEGEND_TEXT = "AI HEATMAP - NOT FOR DIAGNOSTIC USE"
# A perceptually ordered blue -> cyan -> yellow -> red ramp (five anchors, linearly interpolated).
_ANCHORS = np.array(
    [[0, 0, 160], [0, 160, 255], [120, 255, 120], [255, 220, 0], [230, 0, 0]], dtype=np.float32
)


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """[0, 1] values to RGB float32 in [0, 255] along the legend's ramp."""
    x = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(x).astype(np.int64).clip(0, len(_ANCHORS) - 2)
    t = (x - low)[..., None]
    return np.asarray(_ANCHORS[low] * (1 - t) + _ANCHORS[low + 1] * t, dtype=np.float32)


def cam_over_image(cam: np.ndarray, geometry: Geometry, input_size: int) -> np.ndarray:
    """The part of a CAM (h, w) that covers the image (not the padding), scaled to [0, 1]."""
    h, w = cam.shape
    top, left, bottom, right = geometry.window_in(h, w, input_size)
    low, high = float(cam.min()), float(cam.max())
    scaled = (cam - low) / (high - low) if high > low else np.zeros_like(cam)
    image = Image.fromarray(np.asarray(scaled, dtype=np.float32), mode="F")
    return np.asarray(
        image.resize((w * 32, h * 32), Image.Resampling.BILINEAR).crop(
            (round(left * 32), round(top * 32), round(right * 32), round(bottom * 32))
        ),
        dtype=np.float32,
    )


def shrink(display: np.ndarray) -> np.ndarray:
    """The display image at heatmap size (at most MAX_SIDE): what :func:`heatmap` needs of it."""
    rows, columns = display.shape
    scale = min(1.0, MAX_SIDE / max(rows, columns))
    if scale == 1.0:
        return display
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    image = Image.fromarray(np.asarray(display, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BOX), dtype=np.float32)


def heatmap(
    display: np.ndarray, cam: np.ndarray, geometry: Geometry, input_size: int
) -> np.ndarray:
    """RGB uint8 (rows, columns, 3): the image in grey, the CAM in colour where it is warm."""
    grey = shrink(display)  # the pipeline passes an already shrunk image: returned as it is
    out_h, out_w = grey.shape
    warmth = np.asarray(
        Image.fromarray(cam_over_image(cam, geometry, input_size), mode="F").resize(
            (out_w, out_h), Image.Resampling.BILINEAR
        ),
        dtype=np.float32,
    )
    alpha = (np.clip((warmth - 0.3) / 0.7, 0, 1) * 0.55)[..., None]  # cool areas stay grey
    base = np.repeat(np.clip(grey, 0, 1)[..., None] * 255, 3, axis=2)
    rgb = base * (1 - alpha) + colour_ramp(warmth) * alpha
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), mode="RGB")
    _legend(picture)
    return np.asarray(picture)


def _legend(picture: Image.Image) -> None:
    """A colour bar (cool -> warm) and the not-for-diagnosis line, bottom left."""
    draw = ImageDraw.Draw(picture)
    width, height = picture.size
    bar_w, bar_h = max(40, min(200, width // 4)), max(6, min(14, height // 60))
    x0, y0 = 8, height - bar_h - 24
    if y0 < 0 or x0 + bar_w > width:
        return  # too small for a legend; the Series Description still says what it is
    # A dark box behind the legend keeps it readable on bright image areas.
    draw.rectangle([0, max(0, y0 - 18), x0 + max(bar_w, 6 * len(LEGEND_TEXT)) + 8, height], fill=0)
    ramp = colour_ramp(np.linspace(0, 1, bar_w))
    for i, colour in enumerate(ramp):
        draw.line([(x0 + i, y0), (x0 + i, y0 + bar_h)], fill=tuple(int(c) for c in colour))
    draw.rectangle([x0 - 1, y0 - 1, x0 + bar_w, y0 + bar_h], outline=(255, 255, 255))
    draw.text((x0, y0 + bar_h + 4), "low", fill=(255, 255, 255))
    draw.text((x0 + bar_w - 24, y0 + bar_h + 4), "high", fill=(255, 255, 255))
    draw.text((x0, max(0, y0 - 14)), LEGEND_TEXT, fill=(255, 255, 0))
