"""Domain records for tests."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

from triage_node.db.database import Database
from triage_node.domain import ImageResult, InstanceHeader, Skip, SpooledFile, StudyAnalysis

LEASE = timedelta(seconds=60)


def header(study: str = "1.2.3", sop: str = "1.2.3.1.1", modality: str = "CR") -> InstanceHeader:
    """A valid header of one instance in *study* (series ``<study>.1``)."""
    return InstanceHeader(
        study_uid=study,
        series_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        body_part="HAND",
        series_description="PA",
        accession_number="ACC1",
        study_date="20260101",
    )


def analyse(
    store: Database, at: datetime, probability: float | None, skip_reason: str = "no reason"
) -> None:
    """Queue every settled study and complete its job with *probability* (None: all skipped,
    each image for *skip_reason*)."""
    for ready in store.intake.ready_studies(at, timedelta(0), timedelta(hours=1)):
        assert store.queue.enqueue(ready, at) is not None
    while (job := store.queue.claim("w", at, LEASE)) is not None:
        refs = store.queue.instances_of(job.study_id)
        ref = refs[0]
        images = (
            ()
            if probability is None
            else (ImageResult(ref.instance_id, ref.sop_instance_uid, probability, 1, 1, 1, 0, 1),)
        )
        skipped = (
            tuple(Skip(r.instance_id, r.sop_instance_uid, skip_reason) for r in refs)
            if probability is None
            else ()
        )
        analysis = StudyAnalysis(images, skipped, "m", "2", "CPU", 0.3, 0.7, 1.0)
        assert store.queue.complete(job, "w", analysis, at)


def receive(store: Database, study: str, at: datetime, accession: str = "ACC1") -> None:
    h = replace(
        header(study=study, sop=f"{study}.1.{at.timestamp():.0f}"), accession_number=accession
    )
    store.intake.record_instance(h, SpooledFile(f"{h.sop_instance_uid}.dcm", 10, False), None, at)


def spooled(h: InstanceHeader, size: int = 100, replaced: bool = False) -> SpooledFile:
    return SpooledFile(f"{h.study_uid}/{h.series_uid}/{h.sop_instance_uid}.dcm", size, replaced)
