"""`raytrain submit [--address URL] [--no-wait] [key=value ...] -- COMMAND [overrides ...]`: run a raytrain
command on a Ray cluster as a Ray job and follow its logs; `raytrain submit status|logs|stop|resume|list` manage
the jobs.

Everything after `--` is the job's command line and reaches the job untouched; before it come submit's flags and
overrides of `conf/submit.yaml` (interpreter, extra environment variables, pip packages, entrypoint resources).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from raytrain.cluster.jobs import DEFAULT_ADDRESS, ClusterError, JobClient, SubmitConfig, describe, plan, run_of
from raytrain.config import to_dataclass

CONFIG_NAME = "submit"
HELP = "run a command on a Ray cluster as a Ray job; status/logs/stop/resume/list manage jobs"
USAGE = """raytrain submit [--address URL] [--no-wait] [key=value ...] -- COMMAND [overrides ...]
       raytrain submit status|logs|stop JOB [--address URL] [--follow]
       raytrain submit resume RUN [--address URL] [--no-wait] [key=value ...]
       raytrain submit list [--address URL]"""
ACTIONS = ("status", "logs", "stop", "resume", "list")


def main(argv: list[str]) -> None:
    own, inner = _split(argv)
    action = own[0] if own and own[0] in ACTIONS else "submit"
    parser = _parser(action)
    args = parser.parse_intermixed_args(own if action == "submit" else own[1:])
    if (action == "submit") != bool(inner):
        parser.error("the command to run goes after `--`, e.g. `-- train model=openelm_270m`"
                     if action == "submit" else f"`{action}` takes no command after `--`")
    if action in ("submit", "resume"):
        _submit(args, inner)
    else:
        _manage(action, args)


def _submit(args: argparse.Namespace, inner: list[str]) -> None:
    cfg = _submit_config(args.overrides)
    job = plan(inner[0], inner[1:]) if inner else None  # a bad override fails before anything is uploaded
    client = JobClient(args.address)
    if job is not None:
        job_id, run = client.submit(cfg, job, os.environ), job.run_name
    else:
        run = run_of(args.target)
        job_id = client.resubmit(cfg, run, os.environ)
    print(f"submitted job {job_id} to {client.url}" + (f" (run {run})" if run else ""), file=sys.stderr)
    if args.no_wait:
        _print_json({"job": job_id, "run": run, "address": client.url})
    else:
        _follow(client, job_id)


def _manage(action: str, args: argparse.Namespace) -> None:
    client = JobClient(args.address)
    if action == "status":
        _print_json(describe(client.info(args.target)))
    elif action == "logs" and args.follow:
        _follow(client, args.target)
    elif action == "logs":
        sys.stdout.write(client.logs(args.target))
    elif action == "stop":
        was_running, info = client.stop(args.target)
        _print_json({**describe(info), "was_running": was_running})
    else:
        _print_json({"address": client.url, "jobs": [describe(j) for j in client.jobs()]})


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """Submit's own arguments, and the job's command line after the first `--`."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _parser(action: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"raytrain submit{'' if action == 'submit' else ' ' + action}", usage=USAGE)
    p.add_argument("--address", help=f"the head's dashboard, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                                     f"else {DEFAULT_ADDRESS})")
    if action != "submit":
        if action != "list":
            p.add_argument("target", metavar="RUN" if action == "resume" else "JOB")
        if action == "logs":
            p.add_argument("--follow", action="store_true", help="stream new lines until the job ends")
    if action in ("submit", "resume"):
        p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of conf/submit.yaml")
    return p


def _submit_config(overrides: list[str]) -> SubmitConfig:
    from raytrain.cli import compose

    return to_dataclass(SubmitConfig, compose(CONFIG_NAME, overrides), "submit")


def _follow(client: JobClient, job_id: str) -> None:
    try:
        info = client.follow(job_id, sys.stdout)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (raytrain submit logs {job_id} --follow, "
              f"raytrain submit stop {job_id})", file=sys.stderr)
        sys.exit(130)
    if str(info.status) != "SUCCEEDED":
        message = (info.message or "").strip().splitlines()
        raise ClusterError(f"job {job_id} {info.status}: {message[0] if message else 'no message'}"
                           + (f" (resubmit to resume: raytrain submit resume {run_of(job_id)})"
                              if (info.metadata or {}).get("raytrain_run") else ""))
    print(f"job {job_id} SUCCEEDED", file=sys.stderr)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj))
