"""The manifests in cluster/ pass raytrain's checks (Ray's launcher schema, KubeRay's required fields, the training
config), pin the versions the package pins, and each kind of mistake is reported in one line naming the field."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml

from raytrain.cluster.jobs import plan
from raytrain.cluster.manifests import ManifestError, check_document, check_path
from tests.conftest import REPO, raytrain_at_once

CLUSTER = REPO / "cluster"


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_every_manifest_passes_and_none_is_left_unchecked() -> None:
    checked = {str(Path(f).relative_to(CLUSTER)): kinds for f, kinds in check_path(CLUSTER).items()}
    assert checked == {"launcher/aws.yaml": ["launcher"], "launcher/gcp.yaml": ["launcher"],
                       "kuberay/raycluster.yaml": ["RayCluster"], "kuberay/rayjob.yaml": ["RayJob"],
                       "kuberay/rayservice.yaml": ["RayService"], "kuberay/storage.yaml": ["PersistentVolumeClaim"]}


def test_the_rayservice_embeds_the_committed_serve_config() -> None:
    """serveConfigV2 is serving/cluster.yaml verbatim (which tests/serving checks against conf/serve*)."""
    assert load("kuberay/rayservice.yaml")["spec"]["serveConfigV2"] == (REPO / "serving" / "cluster.yaml").read_text()


def test_the_rayjob_cluster_is_exactly_the_training_job() -> None:
    """16 workers of trainer=cluster (8 CPUs, one GPU each) on 2 pods of 8 GPUs and 96 CPUs, a CPU-only head."""
    spec = load("kuberay/rayjob.yaml")["spec"]
    words = spec["entrypoint"].split()
    job = plan(words[3], words[4:])
    assert job.run_name == "openelm-1-1b" and job.trainer.use_gpu and job.trainer.zero_stage == 2
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert group["replicas"] * int(limits["nvidia.com/gpu"]) == job.trainer.num_workers == 16
    assert int(limits["cpu"]) >= int(limits["nvidia.com/gpu"]) * job.trainer.cpus_per_worker
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head


def test_images_and_setup_pin_the_package_versions() -> None:
    pins = dict(re.findall(r'"(ray|deepspeed)\[?[^=]*==([0-9.]+)"', (REPO / "pyproject.toml").read_text()))
    torch = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text())[1]
    assert pins["ray"] == version("ray")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{pins['ray']}-" in dockerfile
    for name in ("launcher/aws.yaml", "launcher/gcp.yaml"):
        doc = load(name)
        assert doc["docker"]["image"].startswith(f"rayproject/ray:{pins['ray']}-")
        setup = doc["setup_commands"][0]
        assert f"torch=={torch}" in setup and f"deepspeed=={pins['deepspeed']}" in setup
    assert f"torch=={torch}" in dockerfile and f"deepspeed=={pins['deepspeed']}" in dockerfile
    assert load("kuberay/raycluster.yaml")["spec"]["rayVersion"] == pins["ray"]


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        for p in parents:
            doc = doc[p]
        if value is KeyError:
            del doc[last]
        else:
            doc[last] = value
    return edit


GPU_GROUP = "spec.rayClusterSpec.workerGroupSpecs.0"
RAY_WORKER = "spec.workerGroupSpecs.0.template.spec.containers.0"


@pytest.mark.parametrize("name, edit, message", [
    ("launcher/aws.yaml", _set("available_node_types.gpu_h100.resources.GPU", "eight"),
     "available_node_types.gpu_h100.resources.GPU: 'eight' is not of type 'integer'"),
    ("launcher/aws.yaml", _set("provider", KeyError), "top level: 'provider' is a required property"),
    ("launcher/gcp.yaml", _set("available_node_types.gpu_h100.min_worker", 1), "('min_worker' was unexpected)"),
    ("launcher/gcp.yaml", _set("head_node_type", "cpu"), "head_node_type: 'cpu' is not one of"),
    ("launcher/aws.yaml", _set("available_node_types.head.resources.GPU", 1),
     "available_node_types.head.resources.GPU: the head runs the driver"),
    ("launcher/aws.yaml", _set("available_node_types.gpu_h100.resources.CPU", 32),
     "resources.CPU: 32 CPUs cannot hold 8 training workers of trainer.cpus_per_worker=8"),
    ("kuberay/rayjob.yaml", _set("spec.entrypoint", "python -m raytrain train trainer.num_workers=many"),
     "spec.entrypoint: trainer.num_workers: Value 'many'"),
    ("kuberay/rayjob.yaml", _set("spec.entrypoint", "python train.py"), "spec.entrypoint: expected `python -m"),
    ("kuberay/rayjob.yaml", _set("spec.entrypoint", "python -m raytrain train trainer=cluster "
                                 "trainer.num_workers=32 trainer.storage_path=/mnt/shared/runs tracking=online"),
     "16 GPUs cannot hold trainer.num_workers=32"),
    ("kuberay/rayjob.yaml", _set("spec.entrypoint", "python -m raytrain train trainer=cluster tracking=online"),
     "spec.entrypoint: trainer.storage_path=outputs/runs is relative"),
    ("kuberay/rayjob.yaml", _set("spec.runtimeEnvYAML", "env_vars: {WANDB_API_KEY: abc}"),
     "spec.runtimeEnvYAML.env_vars.WANDB_API_KEY: a secret in the manifest"),
    ("kuberay/rayjob.yaml", _set("spec.rayClusterSpec.rayVersion", "2.59.0"), "rayVersion: 2.59.0 but raytrain runs"),
    ("kuberay/rayjob.yaml", _set(f"{GPU_GROUP}.groupName", KeyError), f"{GPU_GROUP.replace('.0', '[0]')}.groupName: "
                                                                       "required field missing"),
    ("kuberay/rayjob.yaml", _set(f"{GPU_GROUP}.replicas", 3), "replicas: 3 is outside minReplicas..maxReplicas"),
    ("kuberay/raycluster.yaml", _set(f"{RAY_WORKER}.env", [{"name": "WANDB_API_KEY", "value": "abc"}]),
     "env.WANDB_API_KEY: a secret written into the manifest"),
    ("kuberay/raycluster.yaml", _set(f"{RAY_WORKER}.image", "rayproject/ray:2.60.0"),
     "containers run different images"),
    ("kuberay/raycluster.yaml", _set(f"{RAY_WORKER}.resources.limits.cpu", "16000m"),
     "16 CPUs cannot hold 8 training workers"),
    ("kuberay/raycluster.yaml", _set("spec.headGroupSpec.template.spec.containers.0.resources.limits",
                                     {"cpu": "8", "nvidia.com/gpu": "1"}), "headGroupSpec: the head has GPUs"),
    ("kuberay/storage.yaml", _set("spec.accessModes", ["ReadWriteOnce"]), "checkpoints need ReadWriteMany"),
    ("kuberay/rayservice.yaml", _set("spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas", 2),
     "2 GPUs cannot hold serveConfigV2 GPUs at max_replicas=4"),
    ("kuberay/rayservice.yaml", _set("spec.serveConfigV2", "applications: [{name: x}]"),
     "spec.serveConfigV2: not a Serve config"),
])
def test_a_field_that_does_not_validate_is_named(name: str, edit: Callable[[dict], None], message: str) -> None:
    doc = copy.deepcopy(load(name))
    edit(doc)
    with pytest.raises(ManifestError) as e:
        check_document(doc, name)
    assert message in str(e.value) and str(e.value).startswith(name) and "\n" not in str(e.value)


def test_cluster_check_cli(tmp_path) -> None:
    (tmp_path / "bad.yaml").write_text("cluster_name: x\nprovider: {type: aws\n")
    ok, bad = raytrain_at_once(["cluster-check"], ["cluster-check", f"path={tmp_path / 'bad.yaml'}"])
    assert ok.returncode == 0 and len(json.loads(ok.stdout)["checked"]) == 6
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1
    assert lines[0].startswith(f"raytrain: error: {tmp_path / 'bad.yaml'}: line ") and "not valid YAML" in lines[0]
