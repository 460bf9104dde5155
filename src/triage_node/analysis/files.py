"""``triage-node infer``: the analysis pipeline on plain files, grouped into studies."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from triage_node.analysis.allocator import keep_large_buffers
from triage_node.analysis.pipeline import ImageSource, analyse, read_dataset
from triage_node.analysis.runtime import ModelSession
from triage_node.analysis.scope import UnlabelledPolicy
from triage_node.config import WorkerConfig


def _files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            found.append(path)
    return found


def analyse_files(paths: list[Path], model_dir: Path, config: WorkerConfig) -> dict[str, Any]:
    """Analyse every DICOM file under *paths*; a study is the files sharing a Study UID."""
    keep_large_buffers()
    model = ModelSession(model_dir, intra_op_threads=config.intra_op_threads)
    studies: dict[str, list[ImageSource]] = {}
    names: dict[int, str] = {}  # by file index: two files may carry one SOP Instance UID
    unreadable: list[dict[str, str]] = []
    for index, path in enumerate(_files(paths)):
        try:
            header = read_dataset(path, pixels=False)
            study_uid = str(header.get("StudyInstanceUID", "")) or "(no Study Instance UID)"
            sop_uid = str(header.get("SOPInstanceUID", "")) or f"(file {index})"
        except Exception as exc:
            unreadable.append({"file": str(path), "reason": f"not readable as DICOM: {exc}"})
            continue
        studies.setdefault(study_uid, []).append(ImageSource(index, sop_uid, path))
        names[index] = str(path)

    manifest = model.manifest
    report: dict[str, Any] = {
        "model": {
            "name": manifest.name,
            "version": manifest.version,
            "provider": model.provider,
            "thresholds": {k: p.threshold for k, p in manifest.operating_points.items()},
        },
        "studies": [],
        "unreadable": unreadable,
    }
    for study_uid, sources in studies.items():
        analysis = analyse(
            sources,
            model,
            config.max_batch,
            unlabelled=cast(UnlabelledPolicy, config.unlabelled_images),
        )
        report["studies"].append(
            {
                "study_uid": study_uid,
                "outcome": analysis.outcome.value,
                "score": analysis.score,
                "operating_point": analysis.operating_point,
                "inference_ms": round(analysis.inference_ms, 2),
                "images": [
                    {
                        "file": names[i.instance_id],
                        "sop_instance_uid": i.sop_instance_uid,
                        "probability": round(i.probability, 6),
                        "peak_row": i.peak_row,
                        "peak_column": i.peak_column,
                        "peak_value": round(i.peak_value, 4),
                        "peak_area": round(i.peak_area, 4),
                        "preprocess_ms": round(i.preprocess_ms, 2),
                    }
                    for i in analysis.images
                ],
                "skipped": [
                    {"file": names[k.instance_id], "reason": k.reason} for k in analysis.skipped
                ],
            }
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    model = report["model"]
    lines = [f"model {model['name']} {model['version']} ({model['provider']})"]
    for study in report["studies"]:
        score = "-" if study["score"] is None else f"{study['score']:.4f}"
        point = f" ({study['operating_point']})" if study["operating_point"] else ""
        lines.append(
            f"study {study['study_uid']}: {study['outcome'].upper()} score {score}{point}, "
            f"{len(study['images'])} analysed, {len(study['skipped'])} skipped"
        )
        for image in study["images"]:
            lines.append(
                f"  {image['probability']:.4f}  peak row {image['peak_row']} column "
                f"{image['peak_column']}  {image['file']}"
            )
        for skip in study["skipped"]:
            lines.append(f"  skipped  {skip['file']}: {skip['reason']}")
    for item in report["unreadable"]:
        lines.append(f"unreadable  {item['file']}: {item['reason']}")
    return "\n".join(lines)
