"""`lidit jobs list|status|logs|stop`: the jobs on a Ray cluster, through the Ray Jobs API."""

from __future__ import annotations

import argparse
import json
import time

from lidit.jobs.cluster.submit import add_cluster_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="submitted jobs, oldest first")
    add_cluster_arguments(listing)
    listing.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    state = sub.add_parser("status", help="a job's status and message")
    state.add_argument("job_id")
    add_cluster_arguments(state)
    state.add_argument("--json", action="store_true", help="the job's details as one JSON object")
    logs = sub.add_parser("logs", help="a job's logs")
    logs.add_argument("job_id")
    add_cluster_arguments(logs)
    logs.add_argument("--follow", "-f", action="store_true",
                      help="stream until the job ends; the exit code is 0 only if it SUCCEEDED")
    stop = sub.add_parser("stop", help="stop a job and wait until it has stopped")
    stop.add_argument("job_id")
    add_cluster_arguments(stop)


def _summary(job) -> dict:
    """The fields a user looks at, JSON-ready."""
    return {"id": job.submission_id, "status": str(job.status.value), "job": (job.metadata or {}).get("lidit_job"),
            "entrypoint": job.entrypoint, "message": job.message, "start_time": job.start_time,
            "end_time": job.end_time}


def _when(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _duration(job: dict) -> str:
    if not job["start_time"]:
        return "-"
    end = job["end_time"] or time.time() * 1000
    return f"{(end - job['start_time']) / 1000:.0f}s"


def run(args: argparse.Namespace) -> int:
    from lidit.platform import submission

    cluster = submission.connect(args.address, args.token_file)
    if args.action == "list":
        jobs = [_summary(j) for j in submission.list_jobs(cluster)]
        if args.json:
            print(json.dumps(jobs))
            return 0
        rows = [("ID", "STATUS", "JOB", "STARTED", "TIME")]
        rows += [(j["id"], j["status"], j["job"] or "-", _when(j["start_time"]), _duration(j)) for j in jobs]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        return 0
    if args.action == "status":
        job = _summary(submission.info(cluster, args.job_id))
        print(json.dumps(job) if args.json else f"{job['id']}: {job['status']} ({job['message'] or 'no message'})")
        return 0
    if args.action == "logs":
        if not args.follow:
            print(submission.logs(cluster, args.job_id), end="")
            return 0
        final = submission.follow(cluster, args.job_id)
        print(f"{args.job_id}: {final}")
        return 0 if final == "SUCCEEDED" else 1
    final = submission.stop(cluster, args.job_id)
    print(f"{args.job_id}: {final}")
    return 0 if final in submission.TERMINAL else 1
