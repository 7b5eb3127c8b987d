"""Checks of the cluster manifests in `cluster/` before they reach `ray up` or `kubectl apply`.

Launcher configs are validated against the schema `ray up` uses (`ray/autoscaler/ray-schema.json`) and the
cross-field rules Ray applies at launch; KubeRay manifests against the fields KubeRay requires. Both must also fit
raytrain's training: a head without GPUs, GPU workers with `trainer.cpus_per_worker` CPUs per GPU, one Ray and one
image everywhere, secrets only by reference, and a RayJob whose entrypoint is a valid raytrain command whose
workers its cluster can hold. Every failure is one `ManifestError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from raytrain.config import ConfigError, to_dataclass

SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD)", re.IGNORECASE)
GPU = "nvidia.com/gpu"


class ManifestError(ConfigError):
    pass


def check_path(path: Path) -> dict[str, list[str]]:
    """Check a manifest file, or every .yaml under a directory; returns {file: [kinds]}."""
    files = sorted(path.rglob("*.yaml")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ManifestError(f"{path}: no such manifest file or directory of .yaml files")
    return {str(f): check_file(f) for f in files}


def check_file(path: Path) -> list[str]:
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ManifestError(f"{path}: {where}not valid YAML ({getattr(e, 'problem', e)})") from None
    return [check_document(doc, str(path)) for doc in documents]


def check_document(doc: Any, where: str) -> str:
    """Check one YAML document; returns what it is (`launcher`, `RayCluster`, `RayJob`, ...)."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a mapping at the top, found {type(doc).__name__}")
    if "apiVersion" in doc:
        return _check_kubernetes(doc, where)
    if "provider" in doc or "cluster_name" in doc:
        check_launcher(doc, where)
        return "launcher"
    raise ManifestError(f"{where}: neither a Ray cluster-launcher config (cluster_name, provider) nor a Kubernetes "
                        "manifest (apiVersion, kind)")


def check_launcher(doc: dict[str, Any], where: str) -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(doc))
    if error is not None:
        raise ManifestError(f"{where}: {_path(error.absolute_path) or 'top level'}: {error.message}")
    types = doc.get("available_node_types", {})
    if doc.get("head_node_type") not in types:
        raise ManifestError(f"{where}: head_node_type: {doc.get('head_node_type')!r} is not one of "
                            f"available_node_types ({', '.join(types)})")
    if sum(t.get("min_workers", 0) for t in types.values()) > doc.get("max_workers", 2):
        raise ManifestError(f"{where}: max_workers: smaller than the sum of the node types' min_workers")
    cpus_per_worker = _reference_trainer().cpus_per_worker
    for name, node in types.items():
        gpus, cpus = node["resources"].get("GPU", 0), node["resources"].get("CPU")
        key = f"available_node_types.{name}.resources"
        if name == doc["head_node_type"] and gpus:
            raise ManifestError(f"{where}: {key}.GPU: the head runs the driver and Ray Data; give GPUs to workers")
        if gpus and cpus is not None and cpus < gpus * cpus_per_worker:
            raise ManifestError(f"{where}: {key}.CPU: {cpus} CPUs cannot hold {gpus} training workers of "
                                f"trainer.cpus_per_worker={cpus_per_worker:g}")
    if not any(n["resources"].get("GPU", 0) for n in types.values()):
        raise ManifestError(f"{where}: available_node_types: no node type with GPUs for the training workers")


def _check_kubernetes(doc: dict[str, Any], where: str) -> str:
    kind = doc.get("kind")
    name = _require(doc, "metadata.name", where)
    where = f"{where} ({kind} {name})"
    if kind == "PersistentVolumeClaim":
        if "ReadWriteMany" not in (_require(doc, "spec.accessModes", where) or []):
            raise ManifestError(f"{where}: spec.accessModes: checkpoints need ReadWriteMany, so every pod writes")
    elif kind == "RayCluster":
        check_ray_cluster(_require(doc, "spec", where), where, "spec")
    elif kind == "RayJob":
        check_ray_job(doc["spec"] if isinstance(doc.get("spec"), dict) else {}, where)
    elif kind == "RayService":
        check_ray_service(_require(doc, "spec", where), where)
    else:
        raise ManifestError(f"{where}: kind: expected RayCluster, RayJob, RayService or PersistentVolumeClaim")
    if not str(doc.get("apiVersion")).startswith("ray.io/") and kind != "PersistentVolumeClaim":
        raise ManifestError(f"{where}: apiVersion: {doc.get('apiVersion')!r}; KubeRay resources are ray.io/v1")
    return kind


def check_ray_cluster(spec: dict[str, Any], where: str, key: str, num_workers: int | None = None,
                      cpus_per_worker: float | None = None, demand: str = "trainer.num_workers") -> None:
    """`num_workers`: GPU workers the cluster must hold (a RayJob's training workers, a RayService's replicas; named
    `demand` in errors); cpus_per_worker defaults to trainer=cluster."""
    cpus_per_worker = cpus_per_worker or _reference_trainer().cpus_per_worker
    rv = _require(spec, "rayVersion", where, key)
    if str(rv) != version("ray"):
        raise ManifestError(f"{where}: {key}.rayVersion: {rv} but raytrain runs ray {version('ray')}")
    _require(spec, "headGroupSpec.rayStartParams", where, key)
    head = _pod(spec, "headGroupSpec", where, key)
    if _gpus(head):
        raise ManifestError(f"{where}: {key}.headGroupSpec: the head has GPUs; give them to the worker groups")
    images = {c.get("image") for c in _containers(head)}
    capacity = 0
    for i, group in enumerate(_require(spec, "workerGroupSpecs", where, key) or []):
        gkey = f"{key}.workerGroupSpecs[{i}]"
        for field in ("groupName", "minReplicas", "maxReplicas", "rayStartParams"):
            _require(group, field, where, gkey)
        replicas = group.get("replicas", 0)
        if not group["minReplicas"] <= replicas <= group["maxReplicas"]:
            raise ManifestError(f"{where}: {gkey}.replicas: {replicas} is outside minReplicas..maxReplicas "
                                f"({group['minReplicas']}..{group['maxReplicas']})")
        pod = _pod(group, "", where, gkey)
        gpus, cpus = _gpus(pod), _cpus(pod, group["rayStartParams"])
        if gpus and cpus < gpus * cpus_per_worker:
            raise ManifestError(f"{where}: {gkey}: {cpus:g} CPUs cannot hold {gpus} training workers of "
                                f"trainer.cpus_per_worker={cpus_per_worker:g}")
        capacity += gpus * (group["maxReplicas"] if spec.get("enableInTreeAutoscaling") else replicas)
        images |= {c.get("image") for c in _containers(pod)}
        _check_env(pod, where, gkey)
    _check_env(head, where, f"{key}.headGroupSpec")
    if len(images) != 1:
        raise ManifestError(f"{where}: {key}: containers run different images {sorted(map(str, images))}; Ray needs "
                            "the same Ray and Python on every node")
    if capacity == 0:
        raise ManifestError(f"{where}: {key}.workerGroupSpecs: no group with {GPU} for the training workers")
    if num_workers is not None and capacity < num_workers:
        raise ManifestError(f"{where}: {key}.workerGroupSpecs: {capacity} GPUs cannot hold "
                            f"{demand}={num_workers}")


def check_ray_job(spec: dict[str, Any], where: str) -> None:
    from raytrain.cluster.jobs import plan

    command = str(_require(spec, "entrypoint", where, "spec"))
    words = shlex.split(command)
    if len(words) < 4 or words[1:3] != ["-m", "raytrain"]:
        raise ManifestError(f"{where}: spec.entrypoint: expected `python -m raytrain COMMAND [overrides]`")
    try:
        job = plan(words[3], words[4:])
    except ConfigError as e:
        raise ManifestError(f"{where}: spec.entrypoint: {e}") from None
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    if not isinstance(env, dict):
        raise ManifestError(f"{where}: spec.runtimeEnvYAML: expected a mapping of runtime env keys")
    for name in env.get("env_vars") or {}:
        if SECRET_NAME.search(name):
            raise ManifestError(f"{where}: spec.runtimeEnvYAML.env_vars.{name}: a secret in the manifest; set it in "
                                "the pods from a Secret (valueFrom.secretKeyRef)")
    if "clusterSelector" in spec:
        return
    trainer = job.trainer
    check_ray_cluster(_require(spec, "rayClusterSpec", where, "spec"), where, "spec.rayClusterSpec",
                      trainer.num_workers if trainer and trainer.use_gpu else None,
                      trainer.cpus_per_worker if trainer else None)


def check_ray_service(spec: dict[str, Any], where: str) -> None:
    """`serveConfigV2` is a Serve config that Serve's schema accepts and whose model deployments, at their
    autoscaling maximum, fit the cluster's GPUs with their CPUs."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        serve = ServeDeploySchema.model_validate(yaml.safe_load(str(_require(spec, "serveConfigV2", where, "spec"))))
    except (yaml.YAMLError, ValidationError) as e:
        raise ManifestError(f"{where}: spec.serveConfigV2: not a Serve config ({str(e).splitlines()[0]})") from None
    gpus, cpus_per_gpu = 0.0, 0.0
    for app in serve.applications:
        for d in app.deployments:
            per_replica = (d.ray_actor_options.num_gpus or 0) if d.ray_actor_options else 0
            if per_replica:
                scaling = d.autoscaling_config or {}
                replicas = scaling.get("max_replicas") if isinstance(scaling, dict) else None
                gpus += per_replica * (replicas or d.num_replicas or 1)
                cpus_per_gpu = max(cpus_per_gpu, (d.ray_actor_options.num_cpus or 1) / per_replica)
    check_ray_cluster(_require(spec, "rayClusterSpec", where, "spec"), where, "spec.rayClusterSpec",
                      math.ceil(gpus) if gpus else None, cpus_per_gpu or None, "serveConfigV2 GPUs at max_replicas")


def _reference_trainer() -> Any:
    """The GPU trainer config the launcher and RayCluster node shapes are sized for (trainer=cluster)."""
    from raytrain.cli import compose
    from raytrain.train.config import TrainerConfig

    return to_dataclass(TrainerConfig, compose("train", ["trainer=cluster"]).trainer, "trainer")


def _require(node: Any, dotted: str, where: str, prefix: str = "") -> Any:
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            key = ".".join(filter(None, [prefix, *dotted.split(".")[:i + 1]]))
            raise ManifestError(f"{where}: {key}: required field missing")
        node = node[part]
    return node


def _pod(group: dict[str, Any], key: str, where: str, prefix: str) -> dict[str, Any]:
    spec = _require(group, ".".join(filter(None, [key, "template.spec.containers"])), where, prefix)
    if not spec:
        raise ManifestError(f"{where}: {prefix}.{key + '.' if key else ''}template.spec.containers: empty")
    return _require(group, ".".join(filter(None, [key, "template.spec"])), where, prefix)


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("containers", [])


def _limits(pod: dict[str, Any]) -> dict[str, Any]:
    ray = next(iter(_containers(pod)))  # KubeRay runs Ray in the first container
    resources = ray.get("resources") or {}
    return {**(resources.get("requests") or {}), **(resources.get("limits") or {})}


def _gpus(pod: dict[str, Any]) -> int:
    return int(_limits(pod).get(GPU, 0))


def _cpus(pod: dict[str, Any], start_params: dict[str, Any]) -> float:
    """What Ray will advertise: rayStartParams num-cpus, else the container's CPU limit (`8` or `8000m`)."""
    value = str(start_params.get("num-cpus", _limits(pod).get("cpu", 0)))
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def _check_env(pod: dict[str, Any], where: str, key: str) -> None:
    for c, container in enumerate(_containers(pod)):
        for var in container.get("env") or []:
            if SECRET_NAME.search(str(var.get("name"))) and "value" in var:
                raise ManifestError(f"{where}: {key}.template.spec.containers[{c}].env.{var['name']}: a secret "
                                    "written into the manifest; use valueFrom.secretKeyRef")


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
