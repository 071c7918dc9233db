"""Shared helpers for the deployment tests: the tools (kubectl with kustomize v5, hadolint), the
rendered overlays, and small accessors over the rendered objects.

Tools come from .venv (tests/deploy/requirements.txt, installed by scripts/install-deps.sh) and
fall back to PATH. A missing tool fails the tests: CI installs them, so a skip would hide a
broken install step.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
VENV_BIN = ROOT / ".venv" / "bin"

# The roles a deployment runs, each its own workload named cleave-<role>: a P/D deployment's, and
# an AFD deployment's (docs/afd.md: an AFD group's attention workers are its decode targets).
PD_ROLES = ("scheduler", "frontend", "prefill", "decode")
AFD_ROLES = ("scheduler", "frontend", "prefill", "attention", "ffn")
ROLES = ("scheduler", "frontend", "prefill", "decode", "attention", "ffn")
WORKER_ROLES = ("prefill", "decode", "attention", "ffn")
# Roles run as a StatefulSet, the others as a Deployment: an FFN worker's ordinal is its shard.
STATEFUL_ROLES = ("ffn",)
# The downward-API label holding a StatefulSet pod's ordinal (Kubernetes >= 1.28).
POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"


def is_afd_overlay(overlay):
    """Overlays named *-afd run an AFD group instead of decode workers."""
    return overlay.endswith("-afd")


def overlay_roles(overlay):
    return AFD_ROLES if is_afd_overlay(overlay) else PD_ROLES


def overlay_worker_roles(overlay):
    return tuple(r for r in overlay_roles(overlay) if r in WORKER_ROLES)


def tool(name):
    """The venv's copy of a command line tool, else the one on PATH; fails when neither exists."""
    venv = VENV_BIN / name
    if venv.exists():
        return str(venv)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found in .venv/bin or on PATH: run scripts/install-deps.sh")
    return found


def cleave_bin():
    """The cleave binary ($CLEAVE_BIN, else build/bin/cleave), or None when neither is built."""
    for candidate in (os.environ.get("CLEAVE_BIN"), ROOT / "build" / "bin" / "cleave"):
        if candidate and pathlib.Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


_rendered = {}


def render(overlay):
    """kubectl kustomize deploy/k8s/overlays/<overlay>, parsed; cached per session."""
    if overlay not in _rendered:
        kubectl = tool("kubectl")
        out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        assert docs, f"{overlay} rendered nothing"
        _rendered[overlay] = docs
    return _rendered[overlay]


def objects(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def by_name(docs, kind, name):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def deployment(docs, role):
    return by_name(docs, "Deployment", f"cleave-{role}")


def workload(docs, role):
    """The role's Deployment, or its StatefulSet for STATEFUL_ROLES."""
    return by_name(docs, "StatefulSet" if role in STATEFUL_ROLES else "Deployment", f"cleave-{role}")


def workloads(docs):
    """Every object that runs pods."""
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob",
                                             "Pod")]


def container(dep):
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{dep['metadata']['name']}: one container expected"
    return containers[0]


def flags(c):
    """A container's args as {--flag: value} (every flag is written --flag=value) plus the
    positional words in order under None."""
    out = {None: []}
    for a in c.get("args", []):
        if a.startswith("--"):
            assert "=" in a, f"write flags as --flag=value: {a}"
            k, v = a.split("=", 1)
            assert k not in out, f"flag {k} given twice"
            out[k] = v
        else:
            out[None].append(a)
    return out


def env_values(c, pod_name, pod_ip="127.0.0.1", ordinal=None, cpu="1"):
    """The container's env as the kubelet would set it for one pod: literal values, and the
    downward API fields these manifests use (pod IP, pod name, a StatefulSet pod's ordinal, the CPU
    limit). `ordinal` is None for a Deployment's pod, which has no pod-index label. Fails on any
    other source, so that a new one gets a thought here."""
    out = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = str(e["value"])
            continue
        src = e["valueFrom"]
        if "fieldRef" in src:
            path = src["fieldRef"]["fieldPath"]
            if path == "status.podIP":
                out[e["name"]] = pod_ip
            elif path == "metadata.name":
                out[e["name"]] = pod_name
            elif path == POD_INDEX_FIELD:
                assert ordinal is not None, f"{e['name']}: only a StatefulSet's pods carry the pod-index label"
                out[e["name"]] = str(ordinal)
            else:
                pytest.fail(f"{e['name']}: unexpected fieldRef {path}")
        elif "resourceFieldRef" in src:
            assert src["resourceFieldRef"]["resource"] == "limits.cpu", src
            out[e["name"]] = cpu
        else:
            pytest.fail(f"{e['name']}: unexpected env source {src}")
    return out


def expand(arg, env):
    """`$(NAME)` in an arg, expanded as Kubernetes does (a name the container's env lacks stays
    as written; `$$` escapes)."""
    return re.sub(r"\$(\$|\(([A-Za-z_][A-Za-z0-9_]*)\))",
                  lambda m: "$" if m.group(1) == "$" else env.get(m.group(2), m.group(0)), arg)


def port_of(address):
    m = re.fullmatch(r"(.+):(\d+)", address)
    assert m, f"{address} is not HOST:PORT"
    return m.group(1), int(m.group(2))


def rendered_config(docs):
    """The cleave config the pods read: the one ConfigMap's cleave.yaml, parsed, and its text."""
    cms = objects(docs, "ConfigMap")
    assert len(cms) == 1, f"expected one ConfigMap, found {[c['metadata']['name'] for c in cms]}"
    text = cms[0]["data"]["cleave.yaml"]
    return cms[0], yaml.safe_load(text), text


def kustomize_version(kubectl):
    out = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout).get("kustomizeVersion", "")
