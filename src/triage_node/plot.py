"""A ROC curve as a PNG, drawn with Pillow (no plotting library needed on a hospital server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE, MARGIN = 560, 60
MARK_COLOURS = ((214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


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

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return MARGIN + fpr * side, SIZE - MARGIN - tpr * side

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for tick in np.linspace(0, 1, 6):
        x, y = xy(tick, 0)
        draw.line([x, y, x, y + 5], fill="black")
        draw.text((x - 8, y + 8), f"{tick:.1f}", fill="black")
        x, y = xy(0, tick)
        draw.line([x - 5, y, x, y], fill="black")
        draw.text((x - 30, y - 6), f"{tick:.1f}", fill="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(170, 170, 170))
    draw.line([xy(float(f), float(t)) for f, t in points], fill=(31, 119, 180), width=2)
    draw.text((MARGIN, 20), f"{title}", fill="black")
    draw.text((MARGIN, 36), f"AUROC {auc:.3f}", fill="black")
    draw.text((SIZE // 2 - 60, SIZE - 25), "1 - specificity", fill="black")
    draw.text((5, MARGIN - 20), "sensitivity", fill="black")
    for index, (name, (fpr, tpr)) in enumerate((marks or {}).items()):
        colour = MARK_COLOURS[index % len(MARK_COLOURS)]
        x, y = xy(fpr, tpr)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.text((MARGIN + side - 170, MARGIN + side - 20 - 14 * index), name, fill=colour)
    image.save(path, format="PNG")
