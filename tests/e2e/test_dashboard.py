"""deploy/grafana/cleave.json against a live P/D cluster and a real Prometheus.

Every metric a panel queries must exist in a live scrape of the cluster (frontend, scheduler and
every worker found through discovery), and every panel query, with Grafana's variables filled in,
must be valid PromQL that Prometheus (scraping with the shipped config, see test_prometheus.py)
answers; the core panels must have data after some traffic.
"""
import json
import re

import pytest

from conftest import PD, ROOT, openai_client
from test_prometheus import discovery, http_get, sched_http_port, settle, start_stack, stop_stack

DASHBOARD = ROOT / "deploy" / "grafana" / "cleave.json"
# Grafana's built-in interval variables, as a 1 s-scrape Prometheus would see them.
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__range_s": "300",
                "__range_ms": "300000", "__interval_ms": "15000"}
# Metrics a panel may query that a live stories260K P/D cluster need not expose.
OPTIONAL_METRICS = {
    "cleave_worker_moe_expert_tokens_total",  # MoE models only; stories260K is dense
    # Attention-FFN disaggregation only (attention and ffn workers).
    "cleave_afd_wait_seconds_total", "cleave_afd_exchange_seconds_total", "cleave_ffn_expert_tokens_total",
}
# Panel targets (title, refId) that may have no data on a healthy cluster after plain traffic.
# Every other target must answer: counters and gauges exist from the start (zeros, not gaps).
OPTIONAL_RESULTS = {
    ("MoE tokens per expert", "A"),  # MoE models only
    ("AFD exchange hidden by ping-pong", "A"),  # AFD deployments only
    ("FFN tokens per expert (owners)", "A"),
}
# Titles the issue asks for (each must be a panel).
REQUIRED_PANELS = [
    "Time to first token", "Inter-token latency", "TTFT breakdown (mean seconds per phase)",
    "Requests/s", "Tokens/s", "Queue depth", "Running requests", "KV cache usage per worker",
    "Prefix cache hit rate", "KV transfer bandwidth", "KV transfers and failures",
    "Step time by role", "Mean batch size by role", "Tokens per step by role",
    "MoE tokens per expert", "In-flight requests", "HTTP responses/s by status",
    "Client disconnects", "Preemptions and admission rejections",
]
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
METRIC_NAME = re.compile(r"\bcleave_[a-zA-Z0-9_:]*")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)( \S+)?$")


def load_dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(dash):
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows keep their panels inside


def targets(dash):
    """(panel title, refId, expr) of every Prometheus query in the dashboard."""
    out = []
    for p in all_panels(dash):
        for t in p.get("targets", []):
            out.append((p["title"], t["refId"], t["expr"]))
    return out


def substitute(expr):
    """The expr with Grafana's variables ($x, ${x}, [[x]]) filled in; fails on an unknown one."""
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in GRAFANA_VARS, f"unknown Grafana variable {name!r} in {expr!r}"
        return GRAFANA_VARS[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", repl, expr)


def metric_names(expr):
    return set(METRIC_NAME.findall(expr))


def scrape_families(url):
    """(family names from # TYPE lines with their types, sample names) of one /metrics page."""
    types, samples = {}, set()
    for line in http_get(url).splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, f"{url}: not a sample line: {line!r}"
            samples.add(m.group(1))
    return types, samples


# --- static checks (no cluster) -----------------------------------------------------------------

def test_dashboard_structure():
    dash = load_dashboard()
    assert 36 <= dash["schemaVersion"] <= 41, dash["schemaVersion"]
    assert dash["uid"] and dash["title"]
    assert dash.get("id") is None, "an importable dashboard carries no instance id"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus", ds
    # No hard-coded datasource anywhere: every reference is the template variable.
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "datasource" in node and isinstance(node["datasource"], dict):
                refs.append(node["datasource"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(dash["panels"])
    assert refs
    assert all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs), \
        [r for r in refs if r.get("uid") != "${datasource}"]
    assert "DS_" not in DASHBOARD.read_text(), "no __inputs-style datasource placeholders"
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    titles = {p["title"] for p in all_panels(dash)}
    missing = [t for t in REQUIRED_PANELS if t not in titles]
    assert not missing, missing
    for p in all_panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, (p["title"], g)
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['title']!r} has no query"
    refids = [(t, r) for t, r, _ in targets(dash)]
    assert len(refids) == len(set(refids))
    assert OPTIONAL_RESULTS <= set(refids), OPTIONAL_RESULTS - set(refids)


def test_dashboard_queries_are_well_formed():
    """Latency panels use histogram_quantile over rate(_bucket) summed by le; every query names
    at least one cleave metric (or `up`) and only known Grafana variables."""
    dash = load_dashboard()
    by_title = {}
    for title, _, expr in targets(dash):
        by_title.setdefault(title, []).append(expr)
        substitute(expr)
        assert metric_names(expr) or re.search(r"\bup\{", expr), expr
    for title, metric in (("Time to first token", "cleave_frontend_time_to_first_token_seconds"),
                          ("Inter-token latency", "cleave_frontend_inter_token_latency_seconds")):
        exprs = by_title[title]
        assert len(exprs) == 3
        for quant, expr in zip(("0.5", "0.9", "0.99"), exprs):
            assert expr == (f"histogram_quantile({quant}, sum by (le) "
                            f"(rate({metric}_bucket[$__rate_interval])))"), expr
    breakdown = " ".join(by_title["TTFT breakdown (mean seconds per phase)"])
    for needle in ("cleave_frontend_request_phase_seconds_sum", "cleave_frontend_request_phase_seconds_count",
                   "cleave_scheduler_request_phase_seconds_sum", "cleave_scheduler_request_phase_seconds_count",
                   "by (phase)"):
        assert needle in breakdown, needle


# --- live checks --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    cluster, prom = start_stack(tmp_path_factory, "dash-pd", PD)
    try:
        settle(cluster, prom)  # every target scraped once before: rates see the traffic's increase
        client = openai_client(cluster)
        # Streams and plain requests, sequential (over 64 decode steps, so sampled layer timings
        # exist), then a few at once (batches > 1), one chat request, one bad request.
        for i in range(4):
            list(client.completions.create(model="stories260K", prompt=f"Once upon a time {i}",
                                           max_tokens=40, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}))
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda i: client.completions.create(
                model="stories260K", prompt=f"The cat sat {i}", max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True}), range(4)))
        client.chat.completions.create(model="stories260K", max_tokens=8,
                                       messages=[{"role": "user", "content": "Hi"}])
        import openai
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="stories260K", prompt="x", max_tokens=-1)
        # Two scrape rounds after the traffic: rate() needs two samples of series created by it.
        settle(cluster, prom, scrapes=2)
    except BaseException:
        stop_stack(cluster, prom)
        raise
    yield cluster, prom
    stop_stack(cluster, prom)


def live_names(cluster):
    """Every family and sample name the cluster's /metrics endpoints expose right now."""
    urls = [cluster.url + "/metrics", f"http://127.0.0.1:{sched_http_port(cluster)}/metrics"]
    sd = discovery(cluster)
    assert len(sd) == len(cluster.kv()["workers"]) == 2, sd
    urls += [f"http://{g['targets'][0]}/metrics" for g in sd]
    types, samples = {}, set()
    for url in urls:
        t, s = scrape_families(url)
        types.update(t)
        samples |= s
    return types, samples


def test_every_dashboard_metric_is_exposed(live):
    cluster, _ = live
    types, samples = live_names(cluster)
    missing = []
    for title, ref, expr in targets(load_dashboard()):
        for name in metric_names(expr):
            base = HISTOGRAM_SUFFIX.sub("", name)
            if base != name and types.get(base) == "histogram":
                ok = name in samples
            else:
                ok = name in types and name in samples
            if not ok and name not in OPTIONAL_METRICS:
                missing.append((title, ref, name))
    assert not missing, missing


def test_every_dashboard_query_runs(live):
    _, prom = live
    empty, errors = [], []
    for title, ref, expr in targets(load_dashboard()):
        q = substitute(expr)
        try:
            res = prom.query(q)
        except Exception as e:  # noqa: BLE001 (collect every failure, then fail once)
            errors.append((title, ref, q, str(e)))
            continue
        if not res and (title, ref) not in OPTIONAL_RESULTS:
            empty.append((title, ref, q))
    assert not errors, errors
    assert not empty, empty


def test_core_panels_show_the_traffic(live):
    """A few panels' numbers: the traffic is visible, not just present as zeros."""
    _, prom = live
    dash = load_dashboard()
    exprs = {(t, r): substitute(e) for t, r, e in targets(dash)}

    def values(key):
        return [float(r["value"][1]) for r in prom.query(exprs[key])]

    ttft = values(("Time to first token", "C"))
    assert len(ttft) == 1 and 0 < ttft[0] < 60, ttft
    tokens = values(("Tokens/s", "B"))
    assert len(tokens) == 1 and tokens[0] > 0, tokens
    bandwidth = {r["metric"]["direction"]: float(r["value"][1])
                 for r in prom.query(exprs[("KV transfer bandwidth", "A")])}
    assert bandwidth.get("sent", 0) > 0 and bandwidth.get("received", 0) > 0, bandwidth
    steps = {r["metric"]["role"]: float(r["value"][1])
             for r in prom.query(exprs[("Step time by role", "A")])}
    assert set(steps) == {"prefill", "decode"} and all(0 < v < 10 for v in steps.values()), steps
    batch = {r["metric"]["role"]: float(r["value"][1])
             for r in prom.query(exprs[("Mean batch size by role", "A")])}
    assert batch.get("decode", 0) >= 1, batch
    phases = {r["metric"]["phase"] for r in prom.query(exprs[("TTFT breakdown (mean seconds per phase)", "B")])}
    assert phases == {"queue", "prefill"}, phases
    up = {r["metric"]["job"]: float(r["value"][1]) for r in prom.query(exprs[("Scrape targets up", "A")])}
    assert up == {"cleave-frontend": 1, "cleave-scheduler": 1, "cleave-workers": 2}, up
