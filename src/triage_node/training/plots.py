"""A ROC curve and a reliability diagram as PNGs, drawn with Pillow (no plotting library needed
on a hospital server)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE, MARGIN = 560, 60
MARK_COLOURS = ((214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


def _axes(
    draw: ImageDraw.ImageDraw, x_label: str, y_label: str
) -> Callable[[float, float], tuple[float, float]]:
    side = SIZE - 2 * MARGIN

    def xy(x: float, y: float) -> tuple[float, float]:
        return MARGIN + x * side, SIZE - MARGIN - y * side

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for tick in np.linspace(0, 1, 6):
        x, y = xy(tick, 0)
        draw.line([x, y, x, y + 5], fill="black")
        draw.text((x - 8, y + 8), f"{tick:.1f}", fill="black")
        x, y = xy(0, tick)
        draw.line([x - 5, y, x, y], fill="black")
        draw.text((x - 30, y - 6), f"{tick:.1f}", fill="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(170, 170, 170))
    draw.text((SIZE // 2 - 60, SIZE - 25), x_label, fill="black")
    draw.text((5, MARGIN - 20), y_label, fill="black")
    return xy


def reliability_png(rows: list[dict[str, float]], path: Path, *, title: str, ece: float) -> None:
    """Observed fraction positive against mean predicted probability per bin (the calibration
    table); a dot's area grows with the bin's images. On the diagonal = calibrated."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    xy = _axes(draw, "mean predicted probability", "fraction fractured")
    total = max(1.0, float(sum(r["images"] for r in rows)))
    points = [xy(r["mean_probability"], r["fraction_fractured"]) for r in rows]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    for row, (x, y) in zip(rows, points, strict=True):
        radius = 3 + 12 * (row["images"] / total) ** 0.5
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(31, 119, 180))
    draw.text((MARGIN, 6), title, fill="black")
    draw.text((MARGIN, 20), f"expected calibration error {ece:.3f}", fill="black")
    image.save(path, format="PNG")


def roc_png(
    points: np.ndarray,
    path: Path,
    *,
    title: str,
    auc: float,
    marks: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Draw (false positive rate, true positive rate) *points*; *marks* are labelled dots."""
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    side = SIZE - 2 * MARGIN
    xy = _axes(draw, "1 - specificity", "sensitivity")
    draw.line([xy(float(f), float(t)) for f, t in points], fill=(31, 119, 180), width=2)
    draw.text((MARGIN, 6), f"{title}", fill="black")
    draw.text((MARGIN, 20), f"AUROC {auc:.3f}", fill="black")
    for index, (name, (fpr, tpr)) in enumerate((marks or {}).items()):
        colour = MARK_COLOURS[index % len(MARK_COLOURS)]
        x, y = xy(fpr, tpr)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((MARGIN + side - 170, MARGIN + side - 20 - 14 * index), name, fill=colour)
    image.save(path, format="PNG")
