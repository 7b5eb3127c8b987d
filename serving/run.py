"""Deploy a Serve config (the dictionary `serving.config.serve_config` emits) on the connected Ray cluster, the way
`serve run FILE` does: start Serve with the config's HTTP options, submit the applications, and wait until they run.
`raytrain serve` and the load benchmark start serving through here, so they run exactly what the YAML describes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import serve
from ray.serve.schema import ServeDeploySchema

from raytrain.config import RaytrainError

log = logging.getLogger("raytrain")


def start(config: dict[str, Any], timeout_s: float | None = None) -> str:
    """Deploy `config` and block until every application runs; returns the HTTP base URL."""
    # serve run's own two calls (ray/serve/scripts.py): there is no public API that deploys a config dict
    from ray.serve._private.api import serve_start

    schema = ServeDeploySchema.model_validate(config)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    wait_running([app.name for app in schema.applications], timeout_s)
    host = schema.http_options.host
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{schema.http_options.port}"


def wait_running(names: list[str], timeout_s: float | None) -> None:
    """Poll Serve until the applications run; a failed deployment raises with Serve's message."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status.value if name in apps else "NOT_STARTED" for name in names}
        if states != last:
            log.info("serve: %s", ", ".join(f"{n} {s}" for n, s in states.items()))
            last = states
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            message = apps[failed[0]].message.strip().splitlines()
            raise RaytrainError(f"Serve application {failed[0]!r} failed to deploy: {' | '.join(message[-3:])}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if end is not None and time.monotonic() > end:
            raise RaytrainError(f"Serve applications not running after {timeout_s:g} s: {states}")
        time.sleep(0.5)
