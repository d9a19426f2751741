"""Render the chart (helm-python-sdk: Helm's Go SDK as a library, no helm
binary) and validate manifests with kubernetes-validate --strict against the
two newest Kubernetes minor versions it ships schemas for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml
from kubernetes_validate.utils import all_versions, major_minor

CHART = Path(__file__).parents[2] / "helm" / "sidekey"
RELEASE = "demo"


def newest_minors(n: int = 2) -> list[str]:
    minors = sorted({major_minor(v) for v in all_versions()}, key=lambda v: tuple(int(p) for p in v.split(".")))
    return minors[-n:]


def render(values: dict[str, Any] | None = None, chart: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, the way `helm template` would."""
    with helm.Chart.load(chart) as loaded:
        return loaded.render(values or {}, name=RELEASE, namespace="default")


def manifests(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def validate_strict(docs: list[dict[str, Any]]) -> list[str]:
    """kind/name@minor for each check; raises on the first invalid one. A
    List is validated item by item (there is no schema for List itself)."""
    checked: list[str] = []
    for doc in docs:
        items = doc["items"] if doc.get("kind") == "List" else [doc]
        for item in items:
            for minor in newest_minors():
                kubernetes_validate.validate(item, f"{minor}.0", strict=True)
                checked.append(f"{item['kind'].lower()}/{item['metadata']['name']}@{minor}")
    return checked


def pod_spec_of(docs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec
