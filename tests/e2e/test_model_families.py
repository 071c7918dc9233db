"""MoE (Mixtral, Qwen2-MoE), Mamba and the Jamba hybrid through every serving mode: for each
family, 32 concurrent greedy requests give output identical, token for token, to `cleave generate`
in colocated and in P/D mode (Mamba state shipped from prefill to decode with the attention KV);
afterwards every worker's free blocks and free state slots are back to their starting counts.

The models are the tiny random-initialised golden models (tests/data/golden, byte-level
tokenizer). Small prefill budgets make long prompts run in several chunks (state carried across
chunks), and few running slots make requests wait for a state slot."""
import concurrent.futures as cf
import random

import pytest

from conftest import ROOT, Cluster, grpc_generate_all, offline_generate
from test_grpc_api import pb  # noqa: F401  (fixture)

FAMILIES = ["mixtral", "qwen2_moe", "mamba", "jamba"]
STATEFUL = {"mamba", "jamba"}

PD = [dict(role="prefill", replicas=1, kv_blocks=256, max_batch_tokens=32, max_running=4, threads=1),
      dict(role="decode", replicas=1, kv_blocks=512, max_batch_tokens=64, max_running=8, threads=1)]
COLOCATED = [dict(role="colocated", replicas=1, kv_blocks=512, max_batch_tokens=48, max_running=6,
                  threads=1)]


def make_prompts():
    rng = random.Random(4321)
    words = "alpha beta gamma delta mamba jamba expert router state scan conv token".split()
    out = []
    for i in range(32):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        out.append((text, rng.choice([1, 3, 12, 30])))
    # Two prompts far past one prefill chunk and the colocated budget (context: 256 tokens).
    out[0] = ("state " * 25, 20)
    out[1] = ("expert router " * 6, 16)
    return out


PROMPTS = make_prompts()


def model_dir(family):
    return str(ROOT / "tests" / "data" / "golden" / family)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def reference(family):
    with cf.ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda pm: offline_generate(*pm, model=model_dir(family))["token_ids"],
                           PROMPTS))


def run_all(cluster, pbmod):
    return grpc_generate_all(cluster, pbmod, PROMPTS)


@pytest.mark.parametrize("mode", ["colocated", "pd"])
def test_family_identical_to_offline(tmp_path, family, mode, reference, pb):  # noqa: F811
    cluster = Cluster(tmp_path, PD if mode == "pd" else COLOCATED, model=model_dir(family))
    try:
        before = cluster.wait_idle()["workers"]
        for w in before:
            want = w["num_running"] == 0 and (
                w["num_state_slots"] > 0 if family in STATEFUL else w["num_state_slots"] == 0)
            assert want, w
        got = run_all(cluster, pb)
        for i, (ref, out) in enumerate(zip(reference, got)):
            assert out == ref, f"{family} {mode}: request {i} diverged (prompt {PROMPTS[i][0]!r})"
        after = cluster.wait_idle()["workers"]
        key = lambda ws: {w["name"]: (w["free_blocks"], w["free_state_slots"]) for w in ws}  # noqa: E731
        assert key(after) == key(before)
        if family in STATEFUL:
            # Prefix caching is skipped for models with recurrent state.
            assert cluster.kv()["prefix_cache_hit_tokens"] == 0
            assert all(w["cached_blocks"] == 0 for w in after)
        # Still serving after the burst.
        assert run_all(cluster, pb)[0] == reference[0]
    finally:
        rc = cluster.stop()
    assert rc == 0, cluster.logs()
