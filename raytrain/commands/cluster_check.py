"""`raytrain cluster-check [path=FILE_OR_DIR]`: validate cluster manifests (Ray cluster launcher, KubeRay) against
Ray's schema, KubeRay's required fields and raytrain's training config; prints one JSON object."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from raytrain.cli import CONF_DIR
from raytrain.cluster.manifests import check_path

CONFIG_NAME = "cluster_check"
HELP = "validate the cluster manifests (launcher, KubeRay) before ray up / kubectl apply"


def run(cfg: DictConfig) -> None:
    path = Path(cfg.path) if cfg.path else CONF_DIR.parent / "cluster"
    print(json.dumps({"checked": check_path(path)}))
