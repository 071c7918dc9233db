"""The Kubernetes manifests (deploy/k8s): every overlay renders with kubectl kustomize, every
object validates against the Kubernetes API schemas, and the deployment is what cleave needs:
every role, probes and Prometheus annotations on each process's HTTP port, pod-IP binding, drain
grace within the termination grace period, GPUs only where meant, a config cleave accepts, and for
an AFD overlay one complete AFD group (FFN shards from the StatefulSet ordinals).
"""
import re
import signal
import subprocess
import time

import kubernetes_validate
import pytest
import yaml

from deploylib import (DOCKERFILE, OVERLAYS, POD_INDEX_FIELD, ROOT, WORKER_ROLES, by_name,
                       cleave_bin, container, deployment, env_values, expand, flags, is_afd_overlay,
                       kustomize_version, objects, overlay_roles, overlay_worker_roles, port_of, render,
                       rendered_config, tool, workload, workloads)

# The oldest Kubernetes these manifests support (preStop `sleep` is on by default from 1.30) and
# a recent one; both ship with kubernetes-validate's offline schemas.
KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")
# terminationGracePeriodSeconds must exceed preStop + --drain-grace-s by at least this much, so
# that the drain ends on its own before the kubelet's SIGKILL.
GRACE_MARGIN_S = 10
# The address flags of each role that open a listening socket, and the flag of the port that
# serves /metrics, /health and /ready.
LISTEN_FLAGS = {
    "scheduler": ("--listen", "--http"),
    "frontend": ("--http", "--grpc", "--admin-http"),
    "prefill": ("--http",),
    "decode": ("--http", "--kv-host"),
    "attention": ("--http", "--kv-host"),
    "ffn": ("--http", "--ffn-host"),
}
# Listen flags that take a bare host, and the flag of each one's port.
HOST_FLAGS = {"--kv-host": "--kv-port", "--ffn-host": "--ffn-port"}
HEALTH_FLAG = {"scheduler": "--http", "frontend": "--admin-http", "prefill": "--http", "decode": "--http",
               "attention": "--http", "ffn": "--http"}
SUBCOMMAND = {"scheduler": ["scheduler"], "frontend": ["frontend"], "prefill": ["worker"], "decode": ["worker"],
              "attention": ["worker"], "ffn": ["worker"]}


def is_gpu_overlay(overlay):
    return overlay.startswith("gpu")


def test_expected_overlays_exist():
    assert {"cpu-local", "gpu-pd", "gpu-afd"} <= set(OVERLAYS), OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_runs_exactly_its_roles(overlay):
    """P/D overlays run PD_ROLES, *-afd overlays AFD_ROLES (no decode workers): one workload, one
    Service and one PodDisruptionBudget per role, and nothing else."""
    docs = render(overlay)
    want = {f"cleave-{r}" for r in overlay_roles(overlay)}
    for what, found in (("workloads", workloads(docs)), ("Services", objects(docs, "Service")),
                        ("PodDisruptionBudgets", objects(docs, "PodDisruptionBudget"))):
        names = sorted(d["metadata"]["name"] for d in found)
        assert sorted(want) == names, f"{overlay} {what}: {names}"
    for role in overlay_roles(overlay):
        w = workload(docs, role)
        assert w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == role


def test_kubectl_has_kustomize_v5():
    version = kustomize_version(tool("kubectl"))
    assert re.match(r"v5\.", version), f"kubectl's kustomize is {version!r}; need v5 (kubectl >= 1.27)"


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("k8s_version", KUBERNETES_VERSIONS)
def test_objects_validate_against_schemas(overlay, k8s_version):
    docs = render(overlay)
    errors = []
    for d in docs:
        try:
            kubernetes_validate.validate(d, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{d['kind']}/{d['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_role_runs_its_subcommand(overlay):
    docs = render(overlay)
    for role in overlay_roles(overlay):
        c = container(workload(docs, role))
        f = flags(c)
        assert c["image"].split(":")[0].split("/")[-1] == "cleave", c["image"]
        assert f[None] == SUBCOMMAND[role], f"{role}: positional args {f[None]}"
        if role in WORKER_ROLES:
            assert f["--role"] == role
            assert f["--name"] == "$(POD_NAME)"
    sched = deployment(docs, "scheduler")
    assert sched["spec"]["replicas"] == 1
    assert sched["spec"]["strategy"]["type"] == "Recreate", "two schedulers must never run at once"
    images = {container(workload(docs, r))["image"] for r in overlay_roles(overlay)}
    assert len(images) == 1, f"one image for every role: {images}"
    tag = images.pop().rsplit(":", 1)[-1]
    assert ("cuda" if is_gpu_overlay(overlay) else "cpu") in tag, tag


@pytest.mark.parametrize("overlay,replicas", [("cpu-local", 1), ("gpu-pd", 2), ("gpu-afd", 2)])
def test_worker_replicas(overlay, replicas):
    docs = render(overlay)
    for role in overlay_worker_roles(overlay):
        assert workload(docs, role)["spec"]["replicas"] == replicas, role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_processes_bind_the_pod_ip(overlay):
    docs = render(overlay)
    for role in overlay_roles(overlay):
        c = container(workload(docs, role))
        for a in c.get("args", []):
            assert not re.search(r"0\.0\.0\.0|\[::\]|(^|=)::(:|$)", a), f"{role} binds a wildcard: {a}"
        f = flags(c)
        for flag in LISTEN_FLAGS[role]:
            assert flag in f, f"{role}: {flag} missing"
            host = f[flag] if flag in HOST_FLAGS else port_of(f[flag])[0]
            assert host == "$(POD_IP)", f"{role} {flag}={f[flag]}: must bind $(POD_IP)"
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_arg_variables_come_from_the_env(overlay):
    """Every $(VAR) in the args names one of the container's env vars (Kubernetes leaves an
    unknown one as written, and cleave would get the literal text), from a source the pod has."""
    docs = render(overlay)
    for role in overlay_roles(overlay):
        w = workload(docs, role)
        c = container(w)
        ordinal = 0 if w["kind"] == "StatefulSet" else None
        env = env_values(c, f"cleave-{role}-0", ordinal=ordinal)
        for a in c.get("args", []):
            assert "$(" not in expand(a, env), f"{role}: {a} uses a variable its env does not define"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_prometheus_annotations_use_the_health_port(overlay):
    docs = render(overlay)
    for role in overlay_roles(overlay):
        dep = workload(docs, role)
        c = container(dep)
        _, port = port_of(flags(c)[HEALTH_FLAG[role]])
        live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
        assert (live["path"], live["port"]) == ("/health", port), f"{role} liveness {live}"
        assert (ready["path"], ready["port"]) == ("/ready", port), f"{role} readiness {ready}"
        if "startupProbe" in c:
            start = c["startupProbe"]["httpGet"]
            assert (start["path"], start["port"]) == ("/health", port), f"{role} startup {start}"
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true", role
        assert ann["prometheus.io/path"] == "/metrics", role
        assert ann["prometheus.io/port"] == str(port), f"{role}: scrape port {ann['prometheus.io/port']} != {port}"
        declared = {p["containerPort"] for p in c["ports"]}
        for flag in LISTEN_FLAGS[role]:
            # A bare host's listener: its port flag must be fixed (not 0, any free port) and declared.
            port = int(flags(c)[HOST_FLAGS[flag]]) if flag in HOST_FLAGS else port_of(flags(c)[flag])[1]
            assert port in declared, f"{role}: {flag} port {port} not a containerPort"


def drain_grace(role, f, config):
    """The drain grace a role's process uses: its --drain-grace-s, which must equal the config's."""
    if role == "scheduler":
        return 0  # no drain of its own
    assert "--drain-grace-s" in f, f"{role}: give --drain-grace-s explicitly"
    given = int(f["--drain-grace-s"])
    if role == "frontend":
        from_config = config["frontend"]["drain_grace_s"]
    else:
        from_config = next(g for g in config["workers"] if g["role"] == role)["drain_grace_s"]
    assert given == from_config, f"{role}: --drain-grace-s {given} != config drain_grace_s {from_config}"
    return given


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay):
    docs = render(overlay)
    _, config, _ = rendered_config(docs)
    for role in overlay_roles(overlay):
        spec = workload(docs, role)["spec"]["template"]["spec"]
        c = container(workload(docs, role))
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        needed = pre_stop + drain_grace(role, flags(c), config) + GRACE_MARGIN_S
        assert spec["terminationGracePeriodSeconds"] >= needed, (
            f"{role}: terminationGracePeriodSeconds {spec['terminationGracePeriodSeconds']} < "
            f"preStop {pre_stop} + drain + {GRACE_MARGIN_S}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_only_in_gpu_overlays_and_only_on_workers(overlay):
    docs = render(overlay)
    for role in overlay_roles(overlay):
        spec = workload(docs, role)["spec"]["template"]["spec"]
        res = container(workload(docs, role))["resources"]
        gpu = (res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get("nvidia.com/gpu"))
        if is_gpu_overlay(overlay) and role in WORKER_ROLES:
            assert gpu == (1, 1), f"{overlay} {role}: nvidia.com/gpu requests/limits {gpu}"
            assert spec["nodeSelector"].get("nvidia.com/gpu.present") == "true", role
            assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"]), role
        else:
            assert gpu == (None, None), f"{overlay} {role}: unexpected GPU {gpu}"
            assert "nvidia.com/gpu.present" not in spec.get("nodeSelector", {}), role


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resources_and_security_context(overlay):
    docs = render(overlay)
    uid = dockerfile_uid()
    for role in overlay_roles(overlay):
        spec = workload(docs, role)["spec"]["template"]["spec"]
        c = container(workload(docs, role))
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert r in c["resources"].get(kind, {}), f"{role}: resources.{kind}.{r} missing"
        pod_sc, sc = spec["securityContext"], c["securityContext"]
        assert pod_sc["runAsNonRoot"] is True, role
        assert pod_sc["runAsUser"] == uid, f"{role}: runAsUser {pod_sc['runAsUser']} != the image's USER {uid}"
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", role
        assert sc["allowPrivilegeEscalation"] is False, role
        assert sc["readOnlyRootFilesystem"] is True, role
        assert sc["capabilities"]["drop"] == ["ALL"], role
        assert "add" not in sc["capabilities"], role
        assert spec["automountServiceAccountToken"] is False, role
        if role in WORKER_ROLES:
            env = {e["name"]: e for e in c["env"]}
            assert env["CPU_LIMIT"]["valueFrom"]["resourceFieldRef"]["resource"] == "limits.cpu", role
            assert flags(c)["--threads"] == "$(CPU_LIMIT)", role
    ns = objects(docs, "Namespace")
    assert [n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] for n in ns] == ["restricted"]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == ns[0]["metadata"]["name"], f"{d['kind']}/{d['metadata']['name']}"


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_disruption_budgets(overlay):
    docs = render(overlay)
    roles = overlay_roles(overlay)
    pods = {r: workload(docs, r)["spec"]["template"]["metadata"]["labels"] for r in roles}
    for role in roles:
        svc = by_name(docs, "Service", f"cleave-{role}")
        matched = [r for r, labels in pods.items() if selects(svc["spec"]["selector"], labels)]
        assert matched == [role], f"Service cleave-{role} selects {matched}"
        c = container(workload(docs, role))
        names = {p["name"]: p["containerPort"] for p in c["ports"]}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, f"cleave-{role}: targetPort {p['targetPort']} not a container port"
            assert p["port"] == names[p["targetPort"]], f"cleave-{role}: {p}"
        if role in WORKER_ROLES:
            assert svc["spec"].get("clusterIP") == "None", f"cleave-{role} must be headless"
    sched_ports = {p["name"]: p["port"] for p in by_name(docs, "Service", "cleave-scheduler")["spec"]["ports"]}
    assert sched_ports == {"grpc": 50151, "http": 8100}, sched_ports
    front_ports = {p["name"] for p in by_name(docs, "Service", "cleave-frontend")["spec"]["ports"]}
    assert front_ports == {"http", "grpc"}, f"the admin port stays off the client Service: {front_ports}"
    # Everyone dials the scheduler through its Service, on the port the scheduler listens on.
    sched_listen = port_of(flags(container(deployment(docs, "scheduler")))["--listen"])[1]
    for role in roles:
        if role != "scheduler":
            assert flags(container(workload(docs, role)))["--scheduler"] == f"cleave-scheduler:{sched_listen}", role
    for role in roles:
        pdbs = [p for p in objects(docs, "PodDisruptionBudget")
                if selects(p["spec"]["selector"]["matchLabels"], pods[role])]
        assert len(pdbs) == 1, f"{role}: {len(pdbs)} PodDisruptionBudgets"
    for w in objects(docs, "StatefulSet"):
        # The governing Service: headless, so that each pod gets its own DNS record.
        svc = by_name(docs, "Service", w["spec"]["serviceName"])
        assert svc["spec"].get("clusterIP") == "None", f"{w['metadata']['name']}: {svc['metadata']['name']}"


# Flags naming a file, and the Secret (or ConfigMap) that must provide it.
FILE_FLAGS = {
    "--config": "configMap:cleave-config",
    "--tls-ca": "secret:cleave-tls",
    "--tls-cert": "secret:cleave-tls",
    "--tls-key": "secret:cleave-tls",
    "--kv-secret-file": "secret:cleave-kv-secret",
    "--api-keys-file": "secret:cleave-api-keys",
}
EXPECTED_FILE_FLAGS = {
    "scheduler": {"--config", "--tls-ca", "--tls-cert", "--tls-key"},
    "frontend": {"--config", "--tls-ca", "--tls-cert", "--tls-key", "--api-keys-file"},
    "prefill": {"--config", "--tls-ca", "--tls-cert", "--tls-key", "--kv-secret-file"},
    "decode": {"--config", "--tls-ca", "--tls-cert", "--tls-key", "--kv-secret-file"},
    # The KV transport's secret also authenticates the activation connections between them.
    "attention": {"--config", "--tls-ca", "--tls-cert", "--tls-key", "--kv-secret-file"},
    "ffn": {"--config", "--tls-ca", "--tls-cert", "--tls-key", "--kv-secret-file"},
}


def volume_source(vol):
    if "secret" in vol:
        return f"secret:{vol['secret']['secretName']}", vol["secret"].get("items")
    if "configMap" in vol:
        return f"configMap:{vol['configMap']['name']}", vol["configMap"].get("items")
    return None, None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_file_flags_point_into_their_mounts(overlay):
    docs = render(overlay)
    cm_name = rendered_config(docs)[0]["metadata"]["name"]
    for role in overlay_roles(overlay):
        spec = workload(docs, role)["spec"]["template"]["spec"]
        c = container(workload(docs, role))
        f = flags(c)
        assert {k for k in f if k in FILE_FLAGS} == EXPECTED_FILE_FLAGS[role], role
        vols = {v["name"]: v for v in spec["volumes"]}
        for flag in EXPECTED_FILE_FLAGS[role]:
            path = f[flag]
            mount = next((m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
            assert mount, f"{role} {flag}={path}: no volume mounted there"
            source, items = volume_source(vols[mount["name"]])
            want = FILE_FLAGS[flag].replace("cleave-config", cm_name)
            assert source == want, f"{role} {flag}: from {source}, expected {want}"
            rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
            if items is not None:
                assert rel in {i["path"] for i in items}, f"{role} {flag}: {rel} not among the projected items"
            elif source.startswith("configMap:"):
                assert rel in rendered_config(docs)[0]["data"], f"{role} {flag}: no key {rel}"
            else:
                pytest.fail(f"{role} {flag}: list the Secret's items so a missing key fails the mount")
        # scripts/dev-certs.sh's names: one certificate for the scheduler, the frontend, the workers.
        ident = "worker" if role in WORKER_ROLES else role
        tls = {i["key"] for i in vols["tls"]["secret"]["items"]}
        assert tls == {"ca.crt", f"{ident}.crt", f"{ident}.key"}, f"{role} mounts {tls}"
        assert (f["--tls-cert"], f["--tls-key"]) == (f"/etc/cleave/tls/{ident}.crt", f"/etc/cleave/tls/{ident}.key")


# --- the config -------------------------------------------------------------------------------

def config_key_sets():
    """The allowed keys of each config section, read from the parser itself
    (services/cli/config.cc, its CheckKeys calls), so the test follows the parser."""
    src = (ROOT / "services" / "cli" / "config.cc").read_text()
    sets = {}
    for where, keys in re.findall(r'CheckKeys\(\s*\w+,\s*"([^"]+)",\s*\{([^}]*)\}', src):
        sets[where] = set(re.findall(r'"([^"]+)"', keys))
    assert {"the config", "scheduler", "a worker group", "frontend"} <= set(sets), sets
    return sets


def port_conflicts(config):
    """config.cc's ValidatePorts: no two fixed ports (a worker group claims [port, port + replicas),
    for its HTTP port and, an ffn group, its activation port)."""
    claims = []

    def claim(what, address, may_be_off, count=1):
        if address is None or (may_be_off and address == "off"):
            return
        _, port = port_of(address)
        if port:
            claims.append((what, port, count))

    sched, front = config.get("scheduler", {}), config.get("frontend", {})
    claim("scheduler.listen", sched.get("listen"), False)
    claim("scheduler.http", sched.get("http"), True)
    claim("frontend.http", front.get("http"), False)
    claim("frontend.grpc", front.get("grpc"), True)
    claim("frontend.admin_http", front.get("admin_http"), True)
    for i, g in enumerate(config.get("workers", [])):
        claim(f"workers[{i}].http", g.get("http"), True, g.get("replicas", 1))
        if g.get("role") == "ffn" and g.get("ffn_port"):
            claim(f"workers[{i}].ffn_port", f"{g.get('ffn_listen_host', '127.0.0.1')}:{g['ffn_port']}", False,
                  g.get("replicas", 1))
    bad = []
    for i, a in enumerate(claims):
        for b in claims[i + 1:]:
            if a[1] < b[1] + b[2] and b[1] < a[1] + a[2]:
                bad.append(f"{a[0]} overlaps {b[0]}")
    return bad


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_uses_only_known_keys_and_valid_values(overlay):
    _, config, _ = rendered_config(render(overlay))
    keys = config_key_sets()
    assert set(config) <= keys["the config"], set(config) - keys["the config"]
    assert set(config["scheduler"]) <= keys["scheduler"], set(config["scheduler"]) - keys["scheduler"]
    assert set(config["frontend"]) <= keys["frontend"], set(config["frontend"]) - keys["frontend"]
    assert config["scheduler"].get("policy", "fcfs") in ("fcfs", "priority")
    roles = []
    for g in config["workers"]:
        assert set(g) <= keys["a worker group"], set(g) - keys["a worker group"]
        assert g["role"] in ("prefill", "decode", "colocated", "attention", "ffn"), g["role"]
        assert g.get("replicas", 1) >= 1 and g.get("drain_grace_s", 30) >= 0
        assert 1 <= g.get("micro_batches", 2) <= 8
        if g["role"] in ("attention", "ffn"):
            assert g.get("afd_group"), f"{g['role']}: afd_group is required"
        roles.append(g["role"])
    # `cleave worker --config` reads the first group of its role: one group per role the overlay runs.
    assert sorted(roles) == sorted(overlay_worker_roles(overlay)), f"worker groups {roles}"
    assert config["frontend"].get("drain_grace_s", 30) >= 0
    assert not port_conflicts(config), port_conflicts(config)
    assert "0.0.0.0" not in yaml.safe_dump(config)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_that_loads_the_model_has_it(overlay):
    """The config's model is the one the image bundles, or lies on a read-only PersistentVolumeClaim
    that every pod reading it mounts: the workers (weights) and the frontends (tokenizer). The
    scheduler reads neither."""
    docs = render(overlay)
    model = rendered_config(docs)[1]["model"]
    readers = [r for r in overlay_roles(overlay) if r != "scheduler"]
    if model.startswith("/opt/cleave/models/"):
        # deploy/docker/Dockerfile copies the bundled model to /opt/cleave/models.
        assert model == "/opt/cleave/models/stories260K", model
        assert "COPY --from=build-cpu /out/models /opt/cleave/models" in DOCKERFILE.read_text()
        return
    claims = set()
    for role in readers:
        spec = workload(docs, role)["spec"]["template"]["spec"]
        c = container(workload(docs, role))
        assert "--model" not in flags(c), f"{role}: the model comes from the config"
        mount = next((m for m in c["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")), None)
        assert mount, f"{role}: no volume mounted at {model}"
        assert mount.get("readOnly") is True, f"{role}: mount the model read-only"
        vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
        assert "persistentVolumeClaim" in vol, f"{role}: the model's volume {vol}"
        assert vol["persistentVolumeClaim"].get("readOnly") is True, role
        claims.add(vol["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1, f"one model volume for every pod: {claims}"


def test_config_key_check_catches_a_typo():
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "cleave.yaml").read_text())
    config["scheduler"]["polciy"] = "fcfs"
    assert not set(config["scheduler"]) <= config_key_sets()["scheduler"]
    config["workers"][0]["http"] = config["frontend"]["http"]
    assert port_conflicts(config)
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "base" / "cleave.yaml").read_text())
    assert not port_conflicts(config)
    config["workers"].append({"role": "ffn", "replicas": 2, "afd_group": "g0", "ffn_port": 8199})
    assert port_conflicts(config) == ["workers[0].http overlaps workers[2].ffn_port"], port_conflicts(config)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cleave_accepts_the_config(overlay, tmp_path):
    """The real parser: `cleave scheduler --config` loads the whole file (every section, every
    key checked, ports validated) before it listens."""
    binary = cleave_bin()
    if binary is None:
        pytest.skip("no cleave binary built (set CLEAVE_BIN or build into build/)")
    path = tmp_path / "cleave.yaml"
    path.write_text(rendered_config(render(overlay))[2])
    proc = subprocess.Popen([binary, "scheduler", "--config", str(path), "--listen", "127.0.0.1:0", "--http", "off"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "scheduler listening" in line:
                break
            if not line and proc.poll() is not None:
                pytest.fail(f"cleave rejected the {overlay} config (exit {proc.returncode}): {proc.stderr.read()}")
        else:
            pytest.fail("cleave scheduler did not start listening within 20 s")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def help_flags(binary, subcommand):
    out = subprocess.run([binary, subcommand, "--help"], capture_output=True, text=True, timeout=30)
    return set(re.findall(r"(--[a-z0-9-]+)", out.stdout + out.stderr))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_flag_exists_in_the_cli(overlay):
    """Each flag in the pod args is one the role's subcommand declares (`cleave SUB --help`)."""
    binary = cleave_bin()
    if binary is None:
        pytest.skip("no cleave binary built (set CLEAVE_BIN or build into build/)")
    docs = render(overlay)
    missing = []
    for role in overlay_roles(overlay):
        f = flags(container(workload(docs, role)))
        known = help_flags(binary, SUBCOMMAND[role][0])
        missing += [f"{role}: {k}" for k in f if k is not None and k not in known]
    assert not missing, "flags the binary does not declare:\n" + "\n".join(missing)


# --- AFD ---------------------------------------------------------------------------------------

AFD_OVERLAYS = [o for o in OVERLAYS if is_afd_overlay(o)]


def test_there_is_an_afd_overlay():
    assert AFD_OVERLAYS, OVERLAYS


@pytest.mark.parametrize("overlay", AFD_OVERLAYS)
def test_ffn_shards_are_the_statefulset_ordinals(overlay):
    """Pod cleave-ffn-R runs --ffn-shard R --ffn-shards N, N = replicas = the config's ffn
    replicas: together the pods hold every expert once (model::PlaceExperts of N)."""
    docs = render(overlay)
    sts = workload(docs, "ffn")
    replicas = sts["spec"]["replicas"]
    c = container(sts)
    f = flags(c)
    env = {e["name"]: e for e in c["env"]}
    assert f["--ffn-shard"] == "$(FFN_SHARD)", f["--ffn-shard"]
    assert env["FFN_SHARD"]["valueFrom"]["fieldRef"]["fieldPath"] == POD_INDEX_FIELD
    # The pod-index label exists from Kubernetes 1.28 (beta, on by default).
    assert tuple(map(int, KUBERNETES_VERSIONS[0].split(".")[:2])) >= (1, 28)
    for r in range(replicas):
        values = env_values(c, f"cleave-ffn-{r}", ordinal=r)
        assert expand(f["--ffn-shard"], values) == str(r)
        assert expand(f["--ffn-shards"], values) == str(replicas), (
            f"--ffn-shards {f['--ffn-shards']} = {expand(f['--ffn-shards'], values)}, replicas {replicas}")
    # An explicit expert list would give every pod of the one template the same experts.
    assert "--ffn-experts" not in f and "--ffn-shared-expert" not in f
    group = next(g for g in rendered_config(docs)[1]["workers"] if g["role"] == "ffn")
    assert group.get("replicas", 1) == replicas, "the config's ffn replicas (the shards of `cleave serve`)"
    assert "ffn_experts" not in group and not group.get("ffn_shared_expert")
    # The shards load their weights at the same time, not each after the previous one is ready.
    assert sts["spec"].get("podManagementPolicy") == "Parallel"
    assert sts["spec"].get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"


@pytest.mark.parametrize("overlay", AFD_OVERLAYS)
def test_attention_and_ffn_workers_form_one_group(overlay):
    docs = render(overlay)
    _, config, _ = rendered_config(docs)
    groups = {flags(container(workload(docs, r)))["--afd-group"] for r in ("attention", "ffn")}
    groups |= {g["afd_group"] for g in config["workers"] if g["role"] in ("attention", "ffn")}
    assert len(groups) == 1, f"pods and config name the AFD groups {groups}"
    # Attention workers are decode targets: a KV receiver on the pod IP, like decode workers.
    attention = flags(container(workload(docs, "attention")))
    assert attention["--kv-host"] == "$(POD_IP)" and int(attention["--kv-port"]) > 0
    # FFN workers are dialled at the host they advertise: --kv-advertise-host, else --ffn-host.
    ffn = flags(container(workload(docs, "ffn")))
    assert ffn.get("--kv-advertise-host", ffn["--ffn-host"]) == "$(POD_IP)"
    assert "--kv-host" not in ffn and "--kv-port" not in ffn, "FFN workers hold no KV"


@pytest.mark.parametrize("overlay", AFD_OVERLAYS)
def test_scheduler_service_keeps_readiness_gating(overlay):
    """The scheduler's readiness probe (/ready) is its control plane's, 200 even while an AFD group
    is incomplete, so that the FFN workers that complete the group can reach it through the
    Service: the Service needs no publishNotReadyAddresses (test_pod_args shows /ready 200 and
    /ready/serving 503 then)."""
    svc = by_name(render(overlay), "Service", "cleave-scheduler")
    assert not svc["spec"].get("publishNotReadyAddresses"), svc["spec"]
    probe = container(deployment(render(overlay), "scheduler"))["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready", probe


def test_validation_rejects_a_broken_object():
    """kubernetes-validate in strict mode does reject what the API server would."""
    dep = yaml.safe_load(yaml.safe_dump(deployment(render(OVERLAYS[0]), "decode")))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["prot"] = 8300
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBERNETES_VERSIONS[0], strict=True)


def dockerfile_uid():
    users = re.findall(r"^USER\s+(\d+)(?::\d+)?\s*$", DOCKERFILE.read_text(), re.M)
    assert users and len(set(users)) == 1, f"the runtime stages' USER lines: {users}"
    return int(users[0])
