"""deploy/prometheus/prometheus.yml against a live P/D cluster and a real Prometheus.

The shipped scrape config is loaded and only its addresses and intervals are rewritten (frontend
and scheduler ports, the scheduler's discovery URL, 1 s scrapes): the jobs, discovery and relabel
rules under test are the shipped ones. A known number of requests with exact token counts goes
through the cluster; once Prometheus has scraped every target after the traffic, its HTTP API must
report exactly those numbers for the frontend, the scheduler and the workers (found through the
scheduler's GET /discovery/prometheus).
"""
import copy
import json
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import PD2, ROOT, Cluster, free_port, openai_client

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
SHIPPED = ROOT / "deploy" / "prometheus" / "prometheus.yml"
JOBS = ("cleave-frontend", "cleave-scheduler", "cleave-workers")
# The ports the shipped file assumes: the defaults of `cleave serve` (services/cli/config.cc).
DEFAULT_FRONTEND_PORT, DEFAULT_SCHEDULER_HTTP_PORT = 8000, 8100
SCHEDULER_PHASES = ("queue", "prefill", "kv_transfer", "decode_queue", "first_decode_step")


# --- the cluster's addresses --------------------------------------------------------------------

def sched_http_port(cluster):
    """The scheduler's HTTP port: the fixture's attribute, else the config it wrote."""
    port = getattr(cluster, "sched_http_port", None)
    if port:
        return port
    cfg = yaml.safe_load(cluster.config.read_text())
    addr = (cfg.get("scheduler") or {}).get("http", f"127.0.0.1:{DEFAULT_SCHEDULER_HTTP_PORT}")
    port = int(str(addr).rsplit(":", 1)[1])
    assert port != 0, "the scheduler's HTTP port is dynamic in this config; the test needs it fixed"
    return port


def http_get(url, timeout=10):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        assert r.status == 200, (url, r.status)
        return r.read().decode()


def discovery(cluster):
    """The scheduler's Prometheus HTTP SD answer: [{"targets": [...], "labels": {...}}, ...]."""
    return json.loads(http_get(f"http://127.0.0.1:{sched_http_port(cluster)}/discovery/prometheus"))


# --- the derived Prometheus config --------------------------------------------------------------

def _rewrite_address(addr, ports):
    host, port = addr.rsplit(":", 1)
    assert int(port) in ports, f"{addr}: not one of the default ports {sorted(ports)}"
    return f"{host}:{ports[int(port)]}"


def derive_config(shipped, frontend_port, scheduler_port, interval="1s"):
    """The shipped config (a dict) with addresses and intervals rewritten for a test cluster.

    Checks on the way what the test relies on: the three jobs, static targets on the default
    frontend / scheduler ports, workers through http_sd_configs on the scheduler's
    /discovery/prometheus. Everything else (metrics_path, honor_labels, relabel rules) is kept."""
    cfg = copy.deepcopy(shipped)
    ports = {DEFAULT_FRONTEND_PORT: frontend_port, DEFAULT_SCHEDULER_HTTP_PORT: scheduler_port}
    g = cfg.setdefault("global", {})
    g["scrape_interval"] = g["evaluation_interval"] = interval
    g["scrape_timeout"] = interval
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert sorted(jobs) == sorted(JOBS), sorted(jobs)
    for name, job in jobs.items():
        for key in ("scrape_interval", "scrape_timeout"):
            if key in job:
                job[key] = interval
        statics = job.get("static_configs", [])
        sds = job.get("http_sd_configs", [])
        if name == "cleave-workers":
            assert not statics, "workers must come from discovery, not fixed targets"
            assert len(sds) == 1, sds
            url = urllib.parse.urlsplit(sds[0]["url"])
            assert url.path == "/discovery/prometheus", sds[0]["url"]
            assert url.port == DEFAULT_SCHEDULER_HTTP_PORT, sds[0]["url"]
            sds[0]["url"] = url._replace(netloc=_rewrite_address(url.netloc, ports)).geturl()
            sds[0]["refresh_interval"] = interval
        else:
            assert not sds and len(statics) == 1, job
            want = DEFAULT_FRONTEND_PORT if name == "cleave-frontend" else DEFAULT_SCHEDULER_HTTP_PORT
            assert [t.rsplit(":", 1)[1] for t in statics[0]["targets"]] == [str(want)], statics
            statics[0]["targets"] = [_rewrite_address(t, ports) for t in statics[0]["targets"]]
    return cfg


def load_shipped():
    return yaml.safe_load(SHIPPED.read_text())


# --- a real Prometheus --------------------------------------------------------------------------

class Prometheus:
    def __init__(self, tmp, config):
        tmp = Path(tmp)
        self.config_path = tmp / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        check = subprocess.run([PROMTOOL, "check", "config", str(self.config_path)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                http_get(self.url + "/-/ready", timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError("prometheus did not become ready:\n" + self.logs())
                time.sleep(0.1)

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-8000:]

    def api(self, path, **params):
        try:
            body = json.loads(http_get(self.url + path + "?" + urllib.parse.urlencode(params)))
        except urllib.error.HTTPError as e:  # 400 / 422: Prometheus says why in the body
            raise AssertionError(f"{path} {params}: HTTP {e.code}: {e.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        """Instant query at now: the result vector, [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("/api/v1/query", query=expr, time=f"{time.time():.3f}")
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def value(self, expr):
        """The single value of `expr` (use sum(...) for several series); 0 when there is none."""
        res = self.query(expr)
        assert len(res) <= 1, (expr, res)
        return float(res[0]["value"][1]) if res else 0.0

    def by(self, expr, label):
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def active_targets(self):
        return self.api("/api/v1/targets", state="active")["activeTargets"]

    def wait_scraped_after(self, t0, want_targets, timeout=30):
        """Until `want_targets` targets are active and each has a stored scrape that began after
        t0 (so its samples are queryable)."""
        deadline = time.time() + timeout
        while True:
            stamps = {(r["metric"]["job"], r["metric"]["instance"]): float(r["value"][1])
                      for r in self.query('timestamp(up{job=~"cleave-.*"})')}
            if len(stamps) >= want_targets and all(t > t0 for t in stamps.values()):
                return
            if time.time() > deadline:
                raise AssertionError(f"no scrape after t0={t0} of every target: {stamps}; targets: "
                                     f"{self.active_targets()}\n{self.logs()}")
            time.sleep(0.2)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_stack(tmp_path_factory, name, workers):
    """A cluster and a Prometheus scraping it with the derived config; returns (cluster, prom)."""
    cluster = Cluster(tmp_path_factory.mktemp(name), workers)
    try:
        cfg = derive_config(load_shipped(), cluster.http_port, sched_http_port(cluster))
        prom = Prometheus(tmp_path_factory.mktemp(name + "-prom"), cfg)
    except BaseException:
        cluster.stop()
        raise
    return cluster, prom


def stop_stack(cluster, prom):
    prom.stop()
    rc = cluster.stop()
    assert rc == 0, f"cleave serve exited with {rc}:\n{cluster.logs()}"


def settle(cluster, prom, scrapes=1):
    """After traffic: the cluster idle, then `scrapes` full scrape rounds of every target."""
    cluster.wait_idle()
    want = 2 + len(discovery(cluster))
    for _ in range(scrapes):
        t0 = time.time()
        prom.wait_scraped_after(t0, want)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    cluster, prom = start_stack(tmp_path_factory, "prom-pd", PD2)
    yield cluster, prom
    stop_stack(cluster, prom)


# (max_tokens, stream, chat) of each request; ignore_eos makes every completion exactly max_tokens.
REQUESTS = [(5, False, False), (9, False, False), (3, False, False), (12, True, False),
            (7, True, False), (6, False, True)]


@pytest.fixture(scope="module")
def traffic(stack):
    """Sends REQUESTS once (nothing else generates on this cluster) and waits for the scrapes;
    returns what was sent: requests, prompt and completion tokens."""
    cluster, prom = stack
    settle(cluster, prom)  # every target scraped once before: rates see the traffic's increase
    client = openai_client(cluster)
    prompt_tokens = completion_tokens = 0
    for i, (max_tokens, stream, chat) in enumerate(REQUESTS):
        kw = dict(model="stories260K", max_tokens=max_tokens, temperature=0,
                  extra_body={"ignore_eos": True})
        if chat:
            r = client.chat.completions.create(messages=[{"role": "user", "content": f"Tell me {i}"}], **kw)
            usage = r.usage
        elif stream:
            usage = None
            for chunk in client.completions.create(prompt=f"The little dog {i}", stream=True,
                                                   stream_options={"include_usage": True}, **kw):
                if chunk.usage is not None:
                    usage = chunk.usage
        else:
            usage = client.completions.create(prompt=f"Once upon a time {i}", **kw).usage
        assert usage is not None and usage.completion_tokens == max_tokens, (i, usage)
        assert usage.prompt_tokens > 0
        prompt_tokens += usage.prompt_tokens
        completion_tokens += usage.completion_tokens
    settle(cluster, prom)
    return dict(requests=len(REQUESTS), prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                completions=sum(1 for r in REQUESTS if not r[2]), chats=sum(1 for r in REQUESTS if r[2]))


# --- tests --------------------------------------------------------------------------------------

def test_shipped_config_passes_promtool():
    res = subprocess.run([PROMTOOL, "check", "config", str(SHIPPED)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr
    head = SHIPPED.read_text().splitlines()[0]
    assert head.startswith("#"), "the file starts with a comment header saying how to use it"
    assert "prometheus --config.file deploy/prometheus/prometheus.yml" in SHIPPED.read_text()


def test_shipped_config_keeps_worker_labels():
    """Discovery's `role` and `worker` labels survive the worker job's relabel rules: every rule
    is checked against a target that carries them (keep/drop/labeldrop/labelkeep/replace)."""
    job = next(j for j in load_shipped()["scrape_configs"] if j["job_name"] == "cleave-workers")
    labels = {"role": "decode", "worker": "decode-0", "__address__": "127.0.0.1:1234",
              "__metrics_path__": "/metrics", "job": "cleave-workers"}
    for rule in job.get("relabel_configs", []):
        action = rule.get("action", "replace")
        regex = re.compile("^(?:" + rule.get("regex", "(.*)") + ")$")
        src = rule.get("separator", ";").join(labels.get(l, "") for l in rule.get("source_labels", []))
        if action == "keep":
            assert regex.match(src), rule
        elif action == "drop":
            assert not regex.match(src), rule
        elif action == "labeldrop":
            assert not regex.match("role") and not regex.match("worker"), rule
        elif action == "labelkeep":
            assert regex.match("role") and regex.match("worker"), rule
        elif action == "replace":
            assert rule.get("target_label") not in ("role", "worker"), rule
        else:
            assert action in ("hashmod", "labelmap", "lowercase", "uppercase"), rule


def test_discovery_lists_every_worker(stack):
    cluster, _ = stack
    workers = {w["name"]: w["role"] for w in cluster.kv()["workers"]}
    sd = discovery(cluster)
    assert len(sd) == len(workers) == 4, (sd, workers)
    names = set()
    for group in sd:
        assert len(group["targets"]) == 1, group
        host, port = group["targets"][0].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0, group
        labels = group["labels"]
        assert labels["role"] == workers.get(labels["worker"]), (group, workers)
        names.add(labels["worker"])
        text = http_get(f"http://{group['targets'][0]}/metrics")
        assert "cleave_worker_info{" in text and f'name="{labels["worker"]}"' in text, text[:2000]
    assert names == set(workers)


def test_every_target_up(stack, traffic):
    cluster, prom = stack
    up = {(r["metric"]["job"], r["metric"].get("worker", ""), r["metric"].get("role", "")):
          float(r["value"][1]) for r in prom.query('up{job=~"cleave-.*"}')}
    workers = {w["name"]: w["role"] for w in cluster.kv()["workers"]}
    assert sorted(workers.values()) == ["decode", "decode", "prefill", "prefill"], workers
    want = {("cleave-frontend", "", ""), ("cleave-scheduler", "", "")}
    want |= {("cleave-workers", name, role) for name, role in workers.items()}
    assert set(up) == want, (up, want)
    assert all(v == 1 for v in up.values()), up
    for t in prom.active_targets():
        assert t["health"] == "up", t


def test_worker_series_keep_one_role_label(stack, traffic):
    """The discovery labels and the workers' own `role` label do not clash (no exported_role), and
    each worker's series carry its `worker` name (cleave_worker_info's name is the same)."""
    _, prom = stack
    res = prom.query("cleave_worker_info")
    assert len(res) == 4, res
    for r in res:
        m = r["metric"]
        assert "exported_role" not in m and "exported_worker" not in m, m
        assert m["worker"] == m["name"] and m["role"] in ("prefill", "decode"), m
        assert m["model"], m
    assert prom.query('{job="cleave-workers", exported_role!=""}') == []


def test_frontend_counts(stack, traffic):
    _, prom = stack
    n = traffic["requests"]
    assert prom.value('sum(cleave_frontend_http_requests_total{endpoint="/v1/completions",code="200"})') \
        == traffic["completions"]
    assert prom.value('sum(cleave_frontend_http_requests_total{endpoint="/v1/chat/completions",code="200"})') \
        == traffic["chats"]
    assert prom.value("sum(cleave_frontend_prompt_tokens_total)") == traffic["prompt_tokens"]
    assert prom.value("sum(cleave_frontend_generation_tokens_total)") == traffic["completion_tokens"]
    assert traffic["completion_tokens"] == sum(r[0] for r in REQUESTS)
    assert prom.value("sum(cleave_frontend_time_to_first_token_seconds_count)") == n
    assert prom.value("sum(cleave_frontend_e2e_request_latency_seconds_count)") == n
    assert prom.value('sum(cleave_frontend_time_to_first_token_seconds_bucket{le="+Inf"})') == n
    assert prom.by("sum by (reason) (cleave_frontend_requests_finished_total)", "reason") == \
        {"stop": 0, "length": n, "error": 0, "cancelled": 0}
    assert prom.value("sum(cleave_frontend_requests_in_flight)") == 0
    assert prom.value("sum(cleave_frontend_client_disconnects_total)") == 0
    # Tokens after each generation's first: inter-token gaps never exceed them.
    itl = prom.value("sum(cleave_frontend_inter_token_latency_seconds_count)")
    assert 0 < itl <= traffic["completion_tokens"] - n


def test_frontend_phase_counts(stack, traffic):
    _, prom = stack
    counts = prom.by("sum by (phase) (cleave_frontend_request_phase_seconds_count)", "phase")
    assert counts == {"frontend_in": traffic["requests"], "frontend_out": traffic["requests"]}, counts


def test_scheduler_counts(stack, traffic):
    _, prom = stack
    n = traffic["requests"]
    assert prom.value("sum(cleave_scheduler_requests_admitted_total)") == n
    outcomes = prom.by("sum by (outcome) (cleave_scheduler_requests_finished_total)", "outcome")
    assert outcomes.get("finished") == n and sum(outcomes.values()) == n, outcomes
    assert prom.value("sum(cleave_scheduler_admission_rejections_total)") == 0
    assert prom.value("sum(cleave_scheduler_preemptions_total)") == 0
    assert prom.value("sum(cleave_scheduler_queue_requests)") == 0
    assert prom.value("sum(cleave_scheduler_running_requests)") == 0
    workers = prom.by("sum by (role) (cleave_scheduler_workers)", "role")
    assert {r: n for r, n in workers.items() if n} == {"prefill": 2, "decode": 2}, workers
    # Prompt tokens looked up in the prefix cache: at least one lookup per request.
    assert prom.value("sum(cleave_scheduler_prefix_cache_queried_tokens_total)") > 0
    assert prom.value("sum(cleave_scheduler_schedule_seconds_count)") > 0


def test_scheduler_phase_counts(stack, traffic):
    """In P/D every request goes through all five phases, once."""
    _, prom = stack
    counts = prom.by("sum by (phase) (cleave_scheduler_request_phase_seconds_count)", "phase")
    assert counts == {p: traffic["requests"] for p in SCHEDULER_PHASES}, counts
    sums = prom.by("sum by (phase) (cleave_scheduler_request_phase_seconds_sum)", "phase")
    assert all(v >= 0 for v in sums.values()) and sums["prefill"] > 0, sums


def test_per_worker_capacity(stack, traffic):
    """KV pools as configured (PD2: prefill 512 blocks, decode 1024), nothing held when idle."""
    cluster, prom = stack
    pools = {w["role"]: w["kv_blocks"] for w in PD2}
    roles = {w["name"]: w["role"] for w in cluster.kv()["workers"]}
    names = set(roles)
    sched_total = prom.by("sum by (worker) (cleave_scheduler_worker_kv_blocks)", "worker")
    assert sched_total == {w: pools[roles[w]] for w in names}, sched_total
    worker_total = prom.by("sum by (worker) (cleave_worker_kv_blocks)", "worker")
    assert worker_total == sched_total, worker_total
    used = prom.by("sum by (worker) (cleave_scheduler_worker_kv_blocks_used)", "worker")
    assert used == {w: 0 for w in names}, used
    for metric in ("cleave_scheduler_worker_running_requests", "cleave_scheduler_worker_waiting_requests",
                   "cleave_worker_running_requests"):
        assert prom.by(f"sum by (worker) ({metric})", "worker") == {w: 0 for w in names}, metric


def test_worker_steps(stack, traffic):
    _, prom = stack
    steps = prom.by("sum by (role) (cleave_worker_steps_total)", "role")
    assert steps.get("prefill", 0) > 0 and steps.get("decode", 0) > 0, steps
    # Decode: the longest request alone needs max_tokens - 1 steps (its first token is prefill's).
    assert steps["decode"] >= max(r[0] for r in REQUESTS) - 1, steps
    step_counts = prom.by("sum by (role) (cleave_worker_step_seconds_count)", "role")
    assert step_counts == steps, (step_counts, steps)
    # Every prompt token not found in the prefix cache was prefilled in some chunk.
    hits = prom.value("sum(cleave_scheduler_prefix_cache_hit_tokens_total)")
    chunks = prom.value('sum(cleave_worker_prefill_chunk_tokens_sum{role="prefill"})')
    assert chunks > 0 and chunks >= traffic["prompt_tokens"] - hits, (chunks, hits, traffic)


def test_kv_transfer(stack, traffic):
    _, prom = stack
    sent = prom.value('sum(cleave_worker_kv_transfer_bytes_total{role="prefill",direction="sent"})')
    received = prom.value('sum(cleave_worker_kv_transfer_bytes_total{role="decode",direction="received"})')
    assert sent > 0 and sent == received, (sent, received)
    assert prom.value('sum(cleave_worker_kv_transfer_bytes_total{role="prefill",direction="received"})') == 0
    assert prom.value('sum(cleave_worker_kv_transfer_bytes_total{role="decode",direction="sent"})') == 0
    ok = prom.by('sum by (direction) (cleave_worker_kv_transfers_total{outcome="ok"})', "direction")
    assert ok.get("sent", 0) > 0 and ok.get("sent") == ok.get("received"), ok
    assert prom.value('sum(cleave_worker_kv_transfers_total{outcome="failed"})') == 0
