"""raytrain commands as Ray jobs: plan a submission, submit it, follow, inspect and stop it.

A job runs `python -m raytrain <command> <overrides>` in a copy of this checkout (the runtime env's working dir,
uploaded by Ray, which honours `.gitignore`). Training runs resume by name, so a run's jobs are named
`<run>-a<attempt>`: resubmitting run R creates job R-a<n+1> while `trainer.run_name` stays R, and Ray Train resumes
from `{trainer.storage_path}/R` (Ray submission ids are unique per cluster, a run name is not). Environment
variables of the caller matching `pass_env` travel inside the submission request, never through a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import IO, Any

from raytrain.config import ConfigError, RaytrainError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
ACTIVE = ("PENDING", "RUNNING")
ATTEMPT = re.compile(r"^(?P<run>.+)-a(?P<attempt>[0-9]+)$")


class ClusterError(RaytrainError):
    pass


@dataclass
class SubmitConfig:
    """`conf/submit.yaml`: how a command becomes a Ray job."""

    python: str = "python"  # the cluster's interpreter that runs `-m raytrain`
    working_dir: str | None = None  # None: this raytrain checkout
    excludes: list[str] = field(default_factory=lambda: [".git", ".venv", ".devw", "outputs", "wandb"])
    pass_env: list[str] = field(default_factory=list)  # name patterns sent beside the trainer's (WANDB_*, HF_*, ...)
    pip: list[str] = field(default_factory=list)  # extra requirements installed for the job only
    entrypoint_num_cpus: float = 1.0  # the driver trains the tokenizer and plans the dataset
    entrypoint_num_gpus: float = 0.0
    entrypoint_resources: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """A validated job command line; `run_name` is set for commands that own a resumable training run."""

    command: str
    overrides: list[str]
    run_name: str | None = None
    trainer: Any = None  # the run's TrainerConfig


def plan(command: str, overrides: list[str]) -> Plan:
    """Compose the command's config here, so a bad override fails before anything is uploaded. A training run
    gets its name now (appended as `trainer.run_name` when not given) so that every attempt shares it, and must
    keep its checkpoints and offline logs on storage that outlives the job."""
    from raytrain.cli import commands, compose

    available = {name: mod for name, mod in commands().items() if not hasattr(mod, "main")}
    if command not in available:
        raise ConfigError(f"cannot submit {command!r}; commands: {', '.join(sorted(available))}")
    module = available[command]
    cfg = compose(module.CONFIG_NAME, overrides)
    if "trainer" not in cfg or not hasattr(module, "typed_parts"):
        return Plan(command, list(overrides))
    from raytrain.train.trainer import run_name

    parts = module.typed_parts(cfg)
    trainer = parts["trainer"]
    check_durable(trainer.storage_path, "trainer.storage_path", "its checkpoints (workers on other nodes could "
                  "not write their shards, and a resubmitted run could not resume)")
    if parts["tracking"].mode == "offline":
        check_durable(parts["tracking"].dir, "tracking.dir", "the offline W&B files (or use tracking=online)")
    name = run_name(trainer, parts["model"].name)
    if trainer.run_name is None:
        overrides = [*overrides, f"trainer.run_name={name}"]
    return Plan(command, list(overrides), name, trainer)


def check_durable(path: str, key: str, what: str) -> None:
    """A job's working directory is a temporary copy on one node: relative paths must not land in it."""
    if "://" not in path and not os.path.isabs(os.path.expanduser(path)):
        raise ConfigError(f"{key}={path} is relative: in a job it would resolve inside the job's temporary working "
                          f"directory on one node, which loses {what}; use s3://..., gs://... or an absolute path "
                          f"on a filesystem every node mounts")


def entrypoint(cfg: SubmitConfig, job: Plan) -> str:
    """The job's shell command; each override is quoted so that it reaches Hydra exactly as given."""
    return shlex.join([cfg.python, "-m", "raytrain", job.command, *job.overrides])


def runtime_env(cfg: SubmitConfig, environ: Mapping[str, str]) -> dict[str, Any]:
    """The job's runtime env: the checkout as working dir, and the caller's variables the run needs (the trainer
    forwards the same ones to its workers)."""
    from raytrain.train.trainer import PASSED_ENV

    env = {k: v for k, v in environ.items() if PASSED_ENV.match(k) or any(fnmatch(k, p) for p in cfg.pass_env)}
    out: dict[str, Any] = {"working_dir": str(working_dir(cfg)), "excludes": list(cfg.excludes), "env_vars": env}
    if cfg.pip:
        out["pip"] = list(cfg.pip)
    return out


def working_dir(cfg: SubmitConfig) -> Path:
    from raytrain.cli import CONF_DIR

    root = Path(cfg.working_dir).expanduser().resolve() if cfg.working_dir else CONF_DIR.parent
    if not (root / "raytrain" / "cli.py").is_file() or not (root / "conf").is_dir():
        raise ConfigError(f"working_dir={root} is not a raytrain checkout (raytrain/ and conf/); jobs run the "
                          f"code they are shipped, so submit from a source checkout (pip install -e .)")
    return root


def attempts(jobs: list[Any], run: str) -> dict[int, Any]:
    """The jobs of `run` (`<run>-a<n>`) by attempt number."""
    return {int(m["attempt"]): job for job in jobs
            if job.submission_id and (m := ATTEMPT.match(job.submission_id)) and m["run"] == run}


def next_submission_id(jobs: list[Any], run: str) -> str:
    """`<run>-a<n+1>` after the run's last attempt on this cluster; refused while an attempt is still active,
    since two jobs writing one run would corrupt its checkpoints."""
    mine = attempts(jobs, run)
    for job in mine.values():
        if str(job.status) in ACTIVE:
            raise ClusterError(f"run {run} is still {job.status} as job {job.submission_id}; stop it first "
                               f"(raytrain submit stop {job.submission_id}) or pick another trainer.run_name")
    return f"{run}-a{max(mine, default=0) + 1}"


def run_of(job_id: str) -> str:
    """The run a job id belongs to (`elm1b-a3` -> `elm1b`); other ids are taken as run names."""
    m = ATTEMPT.match(job_id)
    return m["run"] if m else job_id


def auth_headers(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """A bearer header with the cluster token, found where Ray looks for it: RAY_AUTH_TOKEN, then the file
    RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token. None when RAY_AUTH_MODE=disabled or no token exists (clusters
    without token authentication)."""
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and (path := environ.get("RAY_AUTH_TOKEN_PATH")):
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: {e.strerror}") from None
        if not token:
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path} is empty")
    default = Path(environ.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if not token and default.is_file():
        token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def dashboard_url(address: str | None) -> str:
    """`--address`, else RAY_API_SERVER_ADDRESS, else the local head's dashboard; `HOST:PORT` means http."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    return address if "://" in address else f"http://{address}"


class JobClient:
    """Ray's `JobSubmissionClient` with raytrain's token lookup and one-line errors."""

    def __init__(self, address: str | None = None) -> None:
        from ray.job_submission import JobSubmissionClient

        self.url = dashboard_url(address)
        headers = auth_headers()
        # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; pin it to ours
        with self.errors(), _environ(RAY_API_SERVER_ADDRESS=self.url):
            self.client = JobSubmissionClient(self.url, headers=headers)

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        """Turn the client's connection, authentication and request failures into one-line `ClusterError`s."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as e:
            if "Forbidden" in str(e):
                raise ClusterError(f"the Ray cluster at {self.url} rejected the token (RAY_AUTH_TOKEN, "
                                   "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); `ray get-auth-token` on the head "
                                   "prints the right one") from None
            raise ClusterError(f"the Ray cluster at {self.url} requires a token: set RAY_AUTH_TOKEN, or "
                               "RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token "
                               "(`ray get-auth-token` on the head prints it)") from None
        except (ConnectionError, requests.exceptions.ConnectionError, aiohttp.ClientConnectionError):
            raise ClusterError(f"cannot reach the Ray dashboard at {self.url}: is the head running, and is its "
                               "dashboard port reachable from here? (--address http://HEAD:8265)") from None
        except RuntimeError as e:
            text = " ".join(str(e).split())
            if job_id is not None and "404" in text:
                raise ClusterError(f"no job {job_id!r} on {self.url} (`raytrain submit list` shows the jobs "
                                   "there)") from None
            raise ClusterError(f"{self.url}: {text}") from None

    def submit(self, cfg: SubmitConfig, job: Plan, environ: Mapping[str, str]) -> str:
        """Submit `job`; training runs get the next attempt id of their run."""
        with self.errors():
            submission_id = next_submission_id(self.client.list_jobs(), job.run_name) if job.run_name else None
        return self._submit(cfg, entrypoint(cfg, job), submission_id, environ,
                            {"raytrain_command": job.command, "raytrain_run": job.run_name or ""})

    def resubmit(self, cfg: SubmitConfig, run: str, environ: Mapping[str, str]) -> str:
        """A new attempt of `run` with the command line of its last attempt (it resumes from its checkpoints)."""
        with self.errors():
            jobs = self.client.list_jobs()
        mine = attempts(jobs, run)
        if not mine:
            raise ClusterError(f"no job of run {run!r} on {self.url} (`raytrain submit list` shows the jobs there)")
        last = mine[max(mine)]
        return self._submit(cfg, last.entrypoint, next_submission_id(jobs, run), environ, dict(last.metadata or {}))

    def _submit(self, cfg: SubmitConfig, command: str, submission_id: str | None, environ: Mapping[str, str],
                metadata: dict[str, str]) -> str:
        with self.errors():
            return self.client.submit_job(
                entrypoint=command, submission_id=submission_id, runtime_env=runtime_env(cfg, environ),
                metadata=metadata, entrypoint_num_cpus=cfg.entrypoint_num_cpus,
                entrypoint_num_gpus=cfg.entrypoint_num_gpus,
                entrypoint_resources=dict(cfg.entrypoint_resources) or None)

    def info(self, job_id: str) -> Any:
        with self.errors(job_id):
            return self.client.get_job_info(job_id)

    def jobs(self) -> list[Any]:
        with self.errors():
            return sorted(self.client.list_jobs(), key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        self.info(job_id)
        with self.errors(job_id):
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, out: IO[str]) -> Any:
        """Stream the job's logs to `out` until it ends; returns its final details."""
        self.info(job_id)

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with self.errors(job_id):
            asyncio.run(tail())
        return self.wait(job_id)

    def stop(self, job_id: str, timeout_s: float = 60.0) -> tuple[bool, Any]:
        """Stop the job (SIGTERM, then SIGKILL after Ray's grace period); returns (was it running, details)."""
        self.info(job_id)
        with self.errors(job_id):
            stopped = self.client.stop_job(job_id)
        return stopped, self.wait(job_id, timeout_s)

    def wait(self, job_id: str, timeout_s: float = 60.0) -> Any:
        """The job's details once it is in a final state (its status can trail its log stream briefly)."""
        deadline = time.monotonic() + timeout_s
        while not (info := self.info(job_id)).status.is_terminal() and time.monotonic() < deadline:
            time.sleep(0.5)
        return info


def describe(info: Any) -> dict[str, Any]:
    """A job's details as printed by `raytrain submit status` (the runtime env is left out: it holds secrets)."""
    meta = info.metadata or {}
    return {"job": info.submission_id, "status": str(info.status), "run": meta.get("raytrain_run") or None,
            "command": meta.get("raytrain_command"), "entrypoint": info.entrypoint, "message": info.message,
            "start_time": _iso(info.start_time), "end_time": _iso(info.end_time)}


def _iso(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
