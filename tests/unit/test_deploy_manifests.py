"""deploy/kubernetes/ validated offline: the plain manifests against Kubernetes'
schemas (kubernetes-validate, strict: an unknown field fails), the RayCluster
against KubeRay's CRD (its openAPIV3Schema, with unknown fields refused too),
and every controller command line in them against the controller's own parser."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from controller.surface import drain_command
from controller.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
PLAIN = sorted((DEPLOY / "plain").glob("*.yaml"))
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"
CRD = DEPLOY / "kuberay" / "schema-ray.io_rayclusters.yaml"
POD_ENV = {"POD_IP": "10.1.2.3"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] == "RayCluster":
        templates = [doc["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in doc["spec"]["workerGroupSpecs"]]
    elif doc["kind"] in ("StatefulSet", "Deployment"):
        templates = [doc["spec"]["template"]]
    else:
        return []
    return [c for t in templates for c in t["spec"]["containers"]]


def all_documents() -> list[dict[str, Any]]:
    return [d for p in PLAIN for d in documents(p)] + documents(RAYCLUSTER)


def test_there_are_manifests_for_both_variants():
    kinds = sorted(d["kind"] for d in all_documents())
    assert kinds == ["Deployment", "RayCluster", "Service", "Service", "StatefulSet"]


@pytest.mark.parametrize("path", PLAIN, ids=lambda p: p.name)
def test_plain_manifests_are_valid_kubernetes(path):
    for doc in documents(path):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_kubernetes_check_catches_a_misspelt_field():
    (doc,) = documents(DEPLOY / "plain" / "workers.yaml")
    doc["spec"]["replica"] = doc["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _unknown_fields(value: Any, schema: dict[str, Any], where: str = "") -> list[str]:
    """Fields the CRD does not declare (Kubernetes would silently drop them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += _unknown_fields(item, schema["properties"][key], f"{where}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += _unknown_fields(item, schema["additionalProperties"], f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += _unknown_fields(item, schema["items"], f"{where}[{i}]")
    return found


def test_the_raycluster_is_valid_against_kuberays_crd():
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    (doc,) = documents(RAYCLUSTER)
    assert doc["apiVersion"] == f"{crd['spec']['group']}/{version['name']}" and doc["kind"] == "RayCluster"
    schema = version["schema"]["openAPIV3Schema"]
    jsonschema.validate(doc, schema)
    assert _unknown_fields(doc, schema) == []
    # The check catches what it should: a misspelt field, a wrong type.
    bad = yaml.safe_load(RAYCLUSTER.read_text())
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    assert _unknown_fields(bad, schema) == [".spec.headGroupSpec.template.spec.containers[0].readinessprobe"]
    bad["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def _expand(arg: str) -> str:
    for name, value in POD_ENV.items():
        arg = arg.replace(f"$({name})", value)
    return arg


@pytest.mark.parametrize("doc", all_documents(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_controller_command_lines_parse(doc, monkeypatch, tmp_path):
    # A GPU machine, as these manifests ask for: sharded mode needs a model and GPUs.
    monkeypatch.setattr("controller.config.local_gpu_count", lambda environ=None: 1)
    for c in containers(doc):
        assert c["command"] == ["python", "-m", "controller"]
        config = load_config([_expand(a) for a in c["args"]] + ["--state-dir", str(tmp_path)],
                             {"LLMCTL_RAY_TOKEN": "from-the-secret"})
        names = {e["name"] for e in c["env"]}
        assert "LLMCTL_RAY_TOKEN" in names and "POD_IP" in names
        assert config.node_ip_address == "10.1.2.3" and config.log_format == "json"
        if config.role == "head":
            assert config.control_host == "0.0.0.0"  # the kubelet probes the pod IP
            assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
            assert pre_stop[:4] == ["python", "-m", "controller", "drain"]
            drain = drain_command.parse_args(pre_stop[4:])
            assert drain.control_address == f"127.0.0.1:{config.control_port}"
            # The grace period covers the drain hook's wait, which covers the drain.
            pod = (doc["spec"]["template"] if doc["kind"] == "StatefulSet"
                   else doc["spec"]["headGroupSpec"]["template"])["spec"]
            assert pod["terminationGracePeriodSeconds"] > drain.timeout > config.drain_timeout
        else:
            assert config.head_address.endswith(":6379") and config.join_attempts >= 10
