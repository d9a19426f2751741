"""``sidekey inject``: add the sidekey sidecar to Kubernetes workloads, the way
``linkerd inject`` and ``istioctl kube-inject`` do.

Decisions are pure functions over parsed YAML (dicts): where a kind keeps
its pod spec, whether to use a native sidecar, what refuses or skips a
workload. ``inject_text`` is the only part that sees YAML text; it leaves
every document it did not change byte for byte as it was (Secrets included).

Injection is idempotent: a pod that already carries the sidecar has the
previous injection taken out first, then the same parts put back.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from proxy.sidecar import APP_BUNDLE_DIR, APP_CA_DIR, APP_ENV, INIT, SIDECAR, VOLUMES, SidecarConfig, sidecar_parts

# Where each kind keeps its pod spec.
POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "ReplicationController": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# Kinds whose pods run to completion: a regular sidecar container never exits,
# so the pod (and the Job) would never finish. A native sidecar is stopped
# once the app containers have exited.
RUN_TO_COMPLETION = frozenset({"Job", "CronJob"})
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

NativeMode = Literal["auto", "true", "false"]


class InjectError(Exception):
    """A workload inject refuses to change; the message is one line, names the
    workload and the field, and never quotes a value (env values may be secrets)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    workload: str  # kind/name
    action: Literal["injected", "skipped"]
    detail: str


def workload_name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return f"{str(doc.get('kind', '?')).lower()}/{meta.get('name', '?')}"


def pod_template_meta(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata that sits beside the pod spec (the pod's own for a Pod)."""
    path = POD_SPEC_PATHS[doc["kind"]]
    holder: Any = doc
    for key in path[:-1]:
        holder = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(holder, dict):
        return None
    meta = holder.setdefault("metadata", {})
    return meta if isinstance(meta, dict) else None


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    node: Any = doc
    for key in POD_SPEC_PATHS.get(str(doc.get("kind")), ()):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) and doc.get("kind") in POD_SPEC_PATHS else None


def use_native(mode: NativeMode, kind: str, spec: dict[str, Any]) -> bool:
    """auto: native where a regular sidecar would be wrong (pods that run to
    completion) or where the pod already uses native sidecars (so the cluster
    has them); a regular container otherwise, which works on every version."""
    if mode != "auto":
        return mode == "true"
    if kind in RUN_TO_COMPLETION or spec.get("restartPolicy") in ("Never", "OnFailure"):
        return True
    return any(c.get("restartPolicy") == "Always" for c in spec.get("initContainers") or [])


def skip_reason(spec: dict[str, Any]) -> str | None:
    if spec.get("hostNetwork"):
        # On the node's network, 127.0.0.1:8080 is the node's loopback: every
        # host-network process on the node could use the credentials, and a
        # second such pod on the node could not bind. linkerd and istio skip these too.
        return "hostNetwork: sidekey's loopback listener would be the node's, open to every host-network process"
    return None


def is_injected(spec: dict[str, Any]) -> bool:
    names = {c.get("name") for c in (*(spec.get("containers") or []), *(spec.get("initContainers") or []))}
    return SIDECAR in names or INIT in names


def strip_injection(spec: dict[str, Any]) -> None:
    """Take out what an earlier injection added (by name), so injecting again changes nothing."""
    for key in ("initContainers", "containers"):
        if key in spec:
            spec[key] = [c for c in spec[key] or [] if c.get("name") not in (SIDECAR, INIT)]
            if not spec[key] and key == "initContainers":
                del spec[key]
    if "volumes" in spec:
        spec["volumes"] = [v for v in spec["volumes"] or [] if v.get("name") not in VOLUMES]
        if not spec["volumes"]:
            del spec["volumes"]
    for c in spec.get("containers") or []:
        for key, names in (("env", APP_ENV), ("volumeMounts", VOLUMES)):
            if key in c:
                c[key] = [e for e in c[key] or [] if e.get("name") not in names]
                if not c[key]:
                    del c[key]


def conflicts(spec: dict[str, Any], cfg: SidecarConfig) -> list[str]:
    """What in the pod would clash with the sidecar: field paths, never values."""
    found: list[str] = []
    for v in spec.get("volumes") or []:
        if v.get("name") in VOLUMES:
            found.append(f"volume {v.get('name')} (sidekey uses that name)")
    ours = {cfg.port: "proxy", cfg.admin_port: "admin"}
    for key in ("initContainers", "containers"):
        for c in spec.get(key) or []:
            for port in c.get("ports") or []:
                if port.get("containerPort") in ours:
                    which = ours[port["containerPort"]]
                    found.append(f"container {c.get('name')} port {port['containerPort']} (sidekey's {which} port)")
    for c in spec.get("containers") or []:
        for env in c.get("env") or []:
            if env.get("name") in APP_ENV:
                found.append(f"container {c.get('name')} env {env['name']} (sidekey sets it)")
        for m in c.get("volumeMounts") or []:
            if m.get("mountPath") in (APP_CA_DIR, APP_BUNDLE_DIR):
                found.append(f"container {c.get('name')} mountPath {m['mountPath']} (sidekey mounts the CA there)")
    return found


def inject_pod_spec(spec: dict[str, Any], cfg: SidecarConfig) -> None:
    parts = copy.deepcopy(sidecar_parts(cfg))  # the documents must not share objects with each other
    spec["initContainers"] = [*parts.init_containers, *(spec.get("initContainers") or [])]
    spec["containers"] = [*parts.containers, *(spec.get("containers") or [])]
    for c in spec["containers"][len(parts.containers) :]:
        c["env"] = [*parts.app_env, *(c.get("env") or [])]
        c["volumeMounts"] = [*(c.get("volumeMounts") or []), *parts.app_volume_mounts]
    spec["volumes"] = [*(spec.get("volumes") or []), *parts.volumes]


def inject_workload(doc: dict[str, Any], cfg: SidecarConfig, mode: NativeMode) -> Outcome:
    """Inject one workload in place, or raise InjectError (nothing changed then)."""
    name = workload_name(doc)
    spec = pod_spec(doc)
    if spec is None or not isinstance(spec.get("containers"), list) or not spec["containers"]:
        raise InjectError(f"{name}: no pod spec with containers at {'.'.join(POD_SPEC_PATHS[doc['kind']])}")
    reason = skip_reason(spec)
    if reason is not None:
        return Outcome(name, "skipped", reason)
    was_injected = is_injected(spec)
    if was_injected:
        strip_injection(spec)
    native = use_native(mode, doc["kind"], spec)
    if not native and (doc["kind"] in RUN_TO_COMPLETION or spec.get("restartPolicy") in ("Never", "OnFailure")):
        raise InjectError(
            f"{name}: its pods run to completion, and a regular sidecar container never exits; "
            "use --native-sidecar auto or true (Kubernetes >= 1.29)"
        )
    clashes = conflicts(spec, cfg)
    if clashes:
        raise InjectError(f"{name}: already sets what sidekey inject must own: {'; '.join(clashes)}")
    app = spec["containers"][0].get("name")
    inject_pod_spec(spec, dataclasses.replace(cfg, native=native))
    meta = pod_template_meta(doc)
    if meta is not None and app:
        meta.setdefault("annotations", {}).setdefault(DEFAULT_CONTAINER, app)
    kind = "native sidecar" if native else "sidecar container"
    return Outcome(name, "injected", ("re-injected, " if was_injected else "") + kind)


def inject_document(doc: Any, cfg: SidecarConfig, mode: NativeMode) -> list[Outcome]:
    """Inject a document (a workload, or a List of them) in place. Anything
    else (Secrets, Services, ...) is left alone and reports nothing."""
    if not isinstance(doc, dict):
        return []
    if doc.get("kind") == "List" or (str(doc.get("kind", "")).endswith("List") and "items" in doc):
        return [o for item in doc.get("items") or [] for o in inject_document(item, cfg, mode)]
    if doc.get("kind") in POD_SPEC_PATHS:
        return [inject_workload(doc, cfg, mode)]
    return []


# --- YAML text in, YAML text out ------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the init script) as literal blocks, as people write
    them; no anchors and aliases for the parts the sidecar shares."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _documents(text: str) -> Iterator[tuple[str, Any]]:
    """Each document's own source text and its data."""
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            source = text[node.start_mark.index : node.end_mark.index]
            yield source, loader.construct_document(node)
    finally:
        loader.dispose()


def inject_text(text: str, cfg: SidecarConfig, mode: NativeMode) -> tuple[str, list[Outcome]]:
    """The documents of ``text`` in their order, workloads injected; the
    others, and workloads skipped, exactly as they were written."""
    out: list[str] = []
    outcomes: list[Outcome] = []
    for source, doc in _documents(text):
        found = inject_document(doc, cfg, mode)
        outcomes.extend(found)
        if any(o.action == "injected" for o in found):
            out.append(yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=1 << 16).rstrip("\n"))
        else:
            out.append(source.rstrip("\n"))
    return "---\n" + "\n---\n".join(out) + "\n", outcomes
