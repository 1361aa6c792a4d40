"""infra/work-pools templates against the workers' own default base job templates (prefect-kubernetes,
prefect-docker; offline): same structure, variables that are valid JSON Schema, and the command and
torchrun launch a flow run would get."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path

import jsonschema
import pytest

from locdiff.ddp import torchrun_command

POOLS = Path(__file__).resolve().parents[2] / "infra" / "work-pools"
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def _workers():
    from prefect_docker.worker import DockerWorker
    from prefect_kubernetes.worker import KubernetesWorker

    return {"kubernetes-gpu.json": KubernetesWorker, "docker-gpu.json": DockerWorker}


def _placeholders(obj) -> set[str]:
    if isinstance(obj, dict):
        return set().union(*(_placeholders(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_placeholders(v) for v in obj)) if obj else set()
    return set(_PLACEHOLDER.findall(obj)) if isinstance(obj, str) else set()


def _defaults(schema: dict) -> dict:
    return {k: v["default"] for k, v in schema["properties"].items() if "default" in v}


def _render(worker, template: dict, values: dict) -> object:
    from prefect.client.schemas.objects import FlowRun

    cfg_cls = worker.job_configuration
    cfg = asyncio.run(cfg_cls.from_template_and_values(template, values, client=object()))
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name="r"))
    return cfg


@pytest.mark.parametrize("name", ["kubernetes-gpu.json", "docker-gpu.json"])
def test_template_matches_the_worker_default(name):
    ours = json.loads((POOLS / name).read_text())
    default = _workers()[name].get_default_base_job_template()
    assert set(ours) == set(default) == {"job_configuration", "variables"}
    # every field we configure is one the worker's configuration knows, and the core ones are there
    assert set(ours["job_configuration"]) <= set(default["job_configuration"])
    assert {"command", "env", "name", "labels"} <= set(ours["job_configuration"])
    schema = ours["variables"]
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(_defaults(schema), schema)
    assert _placeholders(ours["job_configuration"]) <= set(schema["properties"])
    assert {"gpus", "image", "command", "env"} <= set(schema["properties"])
    if name.startswith("kubernetes"):
        ours_c = ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        dflt_c = default["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert ours["job_configuration"]["job_manifest"]["kind"] == "Job"
        assert ours_c["name"] == dflt_c["name"] and ours_c["args"] == dflt_c["args"] == "{{ command }}"


def test_kubernetes_renders_gpus_and_the_torchrun_launch():
    from prefect_kubernetes.worker import KubernetesWorker

    template = json.loads((POOLS / "kubernetes-gpu.json").read_text())
    cfg = _render(KubernetesWorker, template, {"gpus": 2, "image": "reg/locdiff-worker:0.1"})
    pod = cfg.job_manifest["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "reg/locdiff-worker:0.1"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 == c["resources"]["requests"]["nvidia.com/gpu"]
    assert " ".join(c["args"]) == "prefect flow-run execute"  # the command the pod runs
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert "PREFECT__FLOW_RUN_ID" in env and not any("NPROC" in k for k in env)  # nproc: every visible GPU
    # ... and what the train task then runs inside it, on the pod's 2 GPUs
    assert "--nproc-per-node=2" in torchrun_command(2, "spec.json")


def test_docker_renders_gpus_and_the_torchrun_launch():
    from prefect_docker.worker import DockerWorker

    template = json.loads((POOLS / "docker-gpu.json").read_text())
    cfg = _render(DockerWorker, template, {"gpus": 4})
    req = cfg.container_create_kwargs["device_requests"][0]
    assert req["Count"] == 4 and req["Capabilities"] == [["gpu"]]
    assert cfg.command == "prefect flow-run execute"
    assert "PREFECT__FLOW_RUN_ID" in cfg.env and not any("NPROC" in k for k in cfg.env)
    assert "--nproc-per-node=4" in torchrun_command(4, "spec.json")
