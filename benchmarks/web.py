"""The web interface with 10,000 studies in the database: the server time of each page (the
``Server-Timing`` header the node sets), and the worklist query's plan on PostgreSQL.

    python benchmarks/web.py [--studies 10000] [--repeat 20] [--database sqlite|postgresql|both]

The studies are written straight into a freshly migrated database (one series and instance
each, a third of them analysed and flagged, a tenth of those still unreported: about 330 on
the worklist); one study's instance is a real shared radiograph in the spool, so its study
page and thumbnails render real pixels. The pages are asked for over HTTP from the running web
server (uvicorn), signed in as an admin. The target is 200 ms server time per page.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import requests  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402
from tests.support.peers import SHARED, free_port  # noqa: E402

from triage_node.config import load_config  # noqa: E402
from triage_node.db.database import Database  # noqa: E402
from triage_node.db.engine import make_engine, upgrade  # noqa: E402
from triage_node.db.schema import (  # noqa: E402
    image_results,
    instances,
    jobs,
    series,
    studies,
    study_results,
)
from triage_node.db.study_view import StudyView  # noqa: E402
from triage_node.db.web_access import Role  # noqa: E402
from triage_node.web.app import WebApp  # noqa: E402
from triage_node.web.passwords import hash_password  # noqa: E402
from triage_node.web.server import WebServer  # noqa: E402

TARGET_MS = 200.0
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SAMPLE = SHARED / "data" / "dicom" / "CR_RG3_extremityAP_mono1_10bit_JPEG-lossless.dcm"
BODY_PARTS = ["HAND", "WRIST", "KNEE", "ANKLE", "HIP", "SHOULDER", "FOOT", "ELBOW"]


def populate(db: Database, count: int, now: datetime, spool: Path) -> str:
    """*count* studies over the last two days; returns a flagged, unreported study's UID."""
    rng = random.Random(0)
    study_rows, series_rows, instance_rows, job_rows, result_rows, image_rows = (
        [],
        [],
        [],
        [],
        [],
        [],
    )
    chosen = ""
    for n in range(1, count + 1):
        received = now - timedelta(seconds=rng.uniform(0, 48 * 3600))
        analysed = received + timedelta(seconds=rng.uniform(5, 60))
        flagged = n % 3 == 0
        unreported = flagged and n % 30 == 0
        score = rng.uniform(0.3, 1.0) if flagged else rng.uniform(0.0, 0.08)
        uid = f"2.25.{10**12 + n}"
        study_rows.append(
            {
                "id": n,
                "study_uid": uid,
                "state": "INFERRED",
                "revision": 1,
                "accession_number": f"A{n}",
                "study_date": received.strftime("%Y%m%d"),
                "first_received_at": received,
                "last_received_at": received,
                "queued_at": received,
                "outcome": "positive" if flagged else "negative",
                "inferred_at": analysed,
                "score": score,
                "operating_point": ("high_specificity" if score > 0.6 else "high_sensitivity")
                if flagged
                else None,
                "model_version": "2.0.0",
                "flagged_at": analysed if flagged else None,
                "reported_at": None if unreported or not flagged else analysed + timedelta(hours=1),
                "report_source": None if unreported or not flagged else "hl7",
                "escalations": 0,
            }
        )
        series_rows.append(
            {"id": n, "study_id": n, "series_uid": uid + ".1", "body_part": BODY_PARTS[n % 8]}
        )
        relpath = f"{uid}/{uid}.1/{uid}.1.1.dcm"
        instance_rows.append(
            {
                "id": n,
                "study_id": n,
                "series_id": n,
                "sop_instance_uid": uid + ".1.1",
                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1",
                "transfer_syntax_uid": "1.2.840.10008.1.2.4.70",
                "path": relpath,
                "size_bytes": 1000,
                "received_at": received,
            }
        )
        job_rows.append(
            {
                "id": n,
                "study_id": n,
                "study_revision": 1,
                "state": "DONE",
                "attempts": 1,
                "created_at": received,
                "run_after": received,
                "finished_at": analysed,
            }
        )
        result_rows.append(
            {
                "id": n,
                "job_id": n,
                "study_id": n,
                "study_revision": 1,
                "outcome": "positive" if flagged else "negative",
                "score": score,
                "operating_point": None,
                "positive_high_sensitivity": flagged,
                "positive_high_specificity": flagged and score > 0.6,
                "model_name": "fracture-v2",
                "model_version": "2.0.0",
                "provider": "CPUExecutionProvider",
                "images": 1,
                "skipped": 0,
                "preprocess_ms": 10.0,
                "inference_ms": 6.0,
                "created_at": analysed,
            }
        )
        image_rows.append({"id": n, "study_result_id": n, "instance_id": n, "probability": score})
        if unreported and not chosen:
            chosen = uid
            target = spool / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLE, target)
    with db.engine.begin() as conn:
        for table, rows in (
            (studies, study_rows),
            (series, series_rows),
            (instances, instance_rows),
            (jobs, job_rows),
            (study_results, result_rows),
            (image_results, image_rows),
        ):
            for start in range(0, len(rows), 2000):
                conn.execute(insert(table), rows[start : start + 2000])
        if db.engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE"))
    return chosen


def server_ms(session: requests.Session, url: str) -> float:
    answer = session.get(url, timeout=60)
    answer.raise_for_status()
    timing = answer.headers["server-timing"]
    return float(timing.split("dur=")[1])


def measure(database: str, count: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-web-") as scratch:
        root = Path(scratch)
        url = f"sqlite:///{root / 'bench.sqlite3'}" if database == "sqlite" else POSTGRES
        engine = make_engine(url)
        if database == "postgresql":
            with engine.begin() as conn:
                conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        upgrade(engine)
        db = Database(engine)
        config = load_config(
            None,
            environ={
                "TRIAGE_NODE_STORAGE_DATA_DIR": str(root),
                "TRIAGE_NODE_DATABASE_URL": url,
                "TRIAGE_NODE_WEB_PORT": str(free_port()),
                "TRIAGE_NODE_WEB_SECURE_COOKIES": "false",
                "TRIAGE_NODE_DICOM_PORT": str(free_port()),
            },
        )
        now = datetime.now(UTC)
        study = populate(db, count, now, config.storage.spool_path)
        db.web_access.add_user("bench", hash_password("bench password"), Role.ADMIN, now)
        server = WebServer(config.web, WebApp(config, db)).start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            session = requests.Session()
            session.trust_env = False
            form = session.get(f"{base}/signin").text
            token = form.split('name="csrf_token" value="')[1].split('"')[0]
            session.post(
                f"{base}/signin",
                data={"csrf_token": token, "username": "bench", "password": "bench password"},
            ).raise_for_status()
            sop = f"{study}.1.1"
            pages = {
                "worklist": f"{base}/worklist",
                "worklist (filtered)": f"{base}/worklist?point=high_specificity&age=gt1h",
                "worklist JSON (each refresh)": f"{base}/api/worklist",
                "study page": f"{base}/studies/{study}",
                "dashboard": f"{base}/dashboard",
            }
            results: dict[str, Any] = {}
            thumbnail_first = server_ms(session, f"{base}/studies/{study}/images/{sop}/source.png")
            results["source thumbnail, first (renders)"] = [thumbnail_first]
            results["source thumbnail, cached"] = [
                server_ms(session, f"{base}/studies/{study}/images/{sop}/source.png")
                for _ in range(repeat)
            ]
            for name, page in pages.items():
                server_ms(session, page)  # warm
                results[name] = [server_ms(session, page) for _ in range(repeat)]
            plan = None
            if database == "postgresql":
                query = StudyView.worklist_query().compile(
                    engine, compile_kwargs={"literal_binds": True}
                )
                with engine.connect() as conn:
                    plan = [r[0] for r in conn.execute(text(f"EXPLAIN ANALYZE {query}"))]
            listed = len(db.study_view.worklist())
        finally:
            server.stop()
            engine.dispose()
        return {"results": results, "plan": plan, "worklist": listed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--database", choices=["sqlite", "postgresql", "both"], default="both")
    args = parser.parse_args()
    if not SAMPLE.exists():
        print(f"needs the shared radiograph {SAMPLE}")
        return 2
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    worst = 0.0
    for database in databases:
        measured = measure(database, args.studies, args.repeat)
        print(
            f"\n{database}: {args.studies} studies, {measured['worklist']} on the worklist; "
            f"server time in ms (target {TARGET_MS:.0f}), {os.cpu_count()} cores"
        )
        print(f"  {'page':34} {'median':>8} {'p95':>8} {'max':>8}")
        for name, values in measured["results"].items():
            ordered = sorted(values)
            p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
            print(f"  {name:34} {statistics.median(values):8.1f} {p95:8.1f} {max(values):8.1f}")
            if "first" not in name:
                worst = max(worst, statistics.median(values))
        if measured["plan"]:
            print("  worklist query plan (PostgreSQL, EXPLAIN ANALYZE):")
            for line in measured["plan"]:
                print(f"    {line}")
    print(
        f"\nslowest page median {worst:.1f} ms: {'meets' if worst < TARGET_MS else 'misses'} "
        f"the {TARGET_MS:.0f} ms target"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
