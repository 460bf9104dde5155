"""``triage-node status`` as text: the report of :func:`triage_node.ops.status.collect_status`
for a terminal, and the worklist as a table."""

from __future__ import annotations

from typing import Any


def format_status(report: dict[str, Any]) -> str:
    """The report for people."""
    lines = [f"triage-node {report['version']}: {'HEALTHY' if report['healthy'] else 'UNHEALTHY'}"]
    for problem in report["problems"]:
        lines.append(f"  problem: {problem}")
    listener = report["listener"]
    lines.append(
        f"listener   {listener['ae_title']} @ {listener['host']}:{listener['port']}: "
        f"{listener['detail']}"
        + (f" ({listener['echo_ms']} ms)" if listener.get("echo_ms") is not None else "")
    )
    service = report.get("service")
    if service:
        state = "running" if service["running"] else "not running"
        lines.append(
            f"service    {state}; last heartbeat {service['heartbeat_age_s']} s ago "
            f"({service['owner']})"
        )
    database = report["database"]
    lines.append(
        f"database   {database['url']}: "
        + (f"schema {database.get('revision')}" if database["reachable"] else "unreachable")
    )
    if "studies" in report:
        studies = ", ".join(f"{k} {v}" for k, v in sorted(report["studies"].items())) or "none"
        jobs = ", ".join(f"{k} {v}" for k, v in sorted(report["jobs"].items())) or "none"
        inst = report["instances"]
        lines.append(f"studies    {studies}")
        lines.append(f"jobs       {jobs}")
        last = inst["last_received_at"] or "never"
        age = f" ({inst['last_received_age_s']} s ago)" if inst["last_received_at"] else ""
        lines.append(f"instances  {inst['count']}; last received {last}{age}")
        lines.append(f"associations open: {report['associations_open']}")
        queue = report["queue"]
        age = queue["oldest_queued_age_s"]
        lines.append(
            f"queue      {queue['queued']} queued"
            + (f", oldest {age} s" if age is not None else "")
        )
        for w in report["workers"]:
            lines.append(
                f"worker     {w['owner']}: {w['model']} {w['model_version']} on {w['provider']}, "
                f"{w['jobs_done']} jobs, heartbeat {w['heartbeat_age_s']} s ago"
            )
        if not report["workers"]:
            lines.append("worker     none running")
        for d in report["destinations"]:
            box = d["outbox"]
            lines.append(
                f"destination {d['destination']}: {d['detail']}; outbox {box['PENDING']} pending,"
                f" {box['SENT']} sent, {box['DEAD']} dead"
            )
    if "unreported_positives" in report:
        lines.append(format_priority(report))
    feeds = (
        [f"C-FIND {report['reconcile']['pacs']}: {report['reconcile'].get('detail')}"]
        if report.get("reconcile", {}).get("pacs")
        else []
    )
    if report.get("hl7", {}).get("port"):
        state = "listening" if report["hl7"]["listening"] else "NOT listening"
        feeds.append(f"HL7 port {report['hl7']['port']} {state}")
    if report.get("web", {}).get("port"):
        state = "listening" if report["web"]["listening"] else "NOT listening"
        scheme = "https" if report["web"].get("tls") else "http"
        feeds.append(f"web interface ({scheme}) port {report['web']['port']} {state}")
    if "reconcile" in report:
        lines.append(
            "reports    "
            + ("; ".join(feeds) or "no C-FIND or HL7 feed configured (mark-reported only)")
        )
    model = report["model"]
    lines.append(
        f"model      {model['name']} {model['version']} ({model['dir']})"
        if model["ok"]
        else f"model      not usable: {model['error']}"
    )
    spool = report["spool"]
    lines.append(
        f"spool      {spool['path']}: {spool['bytes'] / 2**20:.1f} MiB used, "
        f"{spool['disk_free_bytes'] / 2**30:.1f} GiB free "
        f"(minimum {spool['min_free_bytes'] / 2**20:.0f} MiB)"
    )
    return "\n".join(lines)


def format_priority(report: dict[str, Any]) -> str:
    """The priority counts and the ranked unreported positives, for people."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report["priority"].items())) or "none"
    unreported = report["unreported_positives"]
    lines = [f"priority   {counts}"]
    lines.append(f"unreported positives: {unreported['total']}")
    lines.extend(format_worklist(unreported["studies"]))
    return "\n".join(lines)


def format_worklist(entries: list[dict[str, Any]]) -> list[str]:
    """A table of ranked unreported positives (entries from :func:`worklist_entry`)."""
    if not entries:
        return []
    lines = [f"  {'rank':>4}  {'score':>6}  {'point':<16}  {'age':>8}  {'esc':>3}  study"]
    for e in entries:
        lines.append(
            f"  {e['rank']:>4}  {e['score']:>6.3f}  {e['operating_point'] or '-':<16}  "
            f"{_duration(e['age_s']):>8}  {e['escalations']:>3}  {e['study_uid']}"
        )
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"
