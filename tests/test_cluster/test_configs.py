"""The cloud and Kubernetes configs cannot be started here: check what can be checked. The launcher
config validates against the schema inside the `ray` package; the manifests parse, name the resources,
images and commands the README gives, and those commands exist in this project."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from tuning import grid

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
IMAGE = "ghcr.io/fer-tune/fer-tune:latest"


def test_aws_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))  # defaults filled as `ray up` does; raises on any schema violation
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0} and types["gpu_worker"]["resources"]["GPU"] == 1
    assert any("pip install" in c and "fer-tune" in c for c in config["setup_commands"])
    assert any("mlflow server" in c and "--artifacts-destination s3://" in c for c in config["head_setup_commands"])


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text()) if d]


def test_kuberay_manifests_name_their_resources_images_and_a_command_that_exists():
    kinds = {(d["kind"], d["metadata"]["name"]) for name in ("raycluster.yaml", "mlflow.yaml", "rayjob.yaml") for d in _docs(name)}
    assert {("RayCluster", "fer-tune"), ("Deployment", "mlflow"), ("Service", "mlflow"), ("RayJob", "fer-tune-grid")} <= kinds
    (cluster, _) = _docs("raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (worker,) = cluster["spec"]["workerGroupSpecs"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    images = {c["image"] for d in _docs("raycluster.yaml") + _docs("mlflow.yaml") + _docs("rayjob.yaml")
              for spec in _pod_specs(d) for c in spec["containers"]}
    assert images == {IMAGE}
    (job,) = _docs("rayjob.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "tuning.grid"]
    grid.build_parser().parse_args(argv[3:])  # every flag exists (a bad one exits 2)
    (deployment,) = [d for d in _docs("mlflow.yaml") if d["kind"] == "Deployment"]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["command"][:4] == ["python", "-m", "mlflow", "server"]


def _pod_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    if doc["kind"] == "Deployment":
        return [spec["template"]["spec"]]
    if doc["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]["spec"]]
    return []


def test_the_grid_command_in_the_launcher_comments_exists():
    (line,) = [l.lstrip("# ") for l in (CLUSTER / "aws-gpu.yaml").read_text().splitlines()
               if l.lstrip("# ").startswith("python -m tuning.grid")]
    argv = shlex.split(line)
    grid.build_parser().parse_args(argv[3:])  # every flag exists (a bad one exits 2)
