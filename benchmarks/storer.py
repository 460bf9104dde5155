"""What storing one received instance costs the node in Python: ``StorageHandlers.stored``
(header read, checks, fsync and placement, committed rows, the log line) per small instance,
with the file's header read by pydicom as the pynetdicom transport's C-STORE handler does, and
with the header fields passed in as the DCMTK transport (``dicom.transport = "dcmtk"``) passes
the ones DCMTK read.

Synthetic 512x512 16-bit instances of one study are written to the spool's incoming directory
first, as a transport leaves them (in the page cache, not yet on disk: the fsync writes them),
then stored one after the other on a fresh SQLite database made by the node's migrations,
alternating the two ways in rounds. Printed: wall and CPU milliseconds per instance (the CPU of
the whole process, so the flusher thread's fsync, and the kernel's work writing the file out,
are in it). With ``--synced`` the files are written to disk before the clock starts, which
leaves out the cost of writing them.

    .venv/bin/python benchmarks/storer.py [--count 200] [--rounds 4] [--synced]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from pydicom.uid import generate_uid  # noqa: E402
from tests.support.synth import radiograph  # noqa: E402

from triage_node.db.engine import make_engine, upgrade  # noqa: E402
from triage_node.db.intake import Intake  # noqa: E402
from triage_node.dicom.storage_scp import StorageHandlers  # noqa: E402
from triage_node.dicom.storing import read_header  # noqa: E402
from triage_node.spool import Spool  # noqa: E402


def arrived(spool: Spool, count: int, tag: str, synced: bool) -> list[Path]:
    """*count* instances of one study, as a receiver leaves them in its incoming directory."""
    study, series = generate_uid(), generate_uid()
    ds = radiograph(512, 512, study_uid=study, series_uid=series)
    files = []
    for index in range(count):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = spool.incoming_dir() / f"{tag}-{index}.part"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    if synced:
        os.sync()
    return files


def store_all(
    handlers: StorageHandlers, files: list[Path], header_given: bool
) -> tuple[float, float]:
    """Wall and CPU milliseconds per instance."""
    # The requests' UIDs, and the headers a native transport would send along, read before
    # the clock starts.
    headers = [read_header(path) for path in files]
    wall, cpu = time.perf_counter(), time.process_time()
    for path, header in zip(files, headers, strict=True):
        request = SimpleNamespace(
            AffectedSOPClassUID=header.sop_class_uid,
            AffectedSOPInstanceUID=header.sop_instance_uid,
        )
        given = header if header_given else None
        code, comment = handlers.stored("bench", path, request, "BENCH", given)
        assert code == 0, comment
    count = len(files)
    return (
        (time.perf_counter() - wall) / count * 1000,
        (time.process_time() - cpu) / count * 1000,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="instances per round and way")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--synced", action="store_true", help="files on disk before storing")
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"pydicom reads": [], "header given": []}
    with tempfile.TemporaryDirectory(prefix="storer-bench-") as tmp:
        root = Path(tmp)
        engine = make_engine(f"sqlite:///{root / 'node.sqlite'}")
        upgrade(engine)
        spool = Spool(root / "spool")
        spool.prepare()
        handlers = StorageHandlers(spool, Intake(engine), min_free_bytes=0)
        for round_ in range(args.rounds):
            ways = list(results)
            if round_ % 2:
                ways.reverse()
            for way in ways:
                files = arrived(spool, args.count, f"{round_}-{way[0]}", args.synced)
                results[way].append(store_all(handlers, files, way == "header given"))
    for way, measured in results.items():
        wall = statistics.median(w for w, _ in measured)
        cpu = statistics.median(c for _, c in measured)
        print(f"{way:14s} {wall:5.2f} ms wall  {cpu:5.2f} ms CPU per instance", end="")
        print(f" (median of {args.rounds})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
