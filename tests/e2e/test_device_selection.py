"""Run-time backend selection from the user's side: `--device` on `cleave generate` and
`cleave worker`, on this GPU-less machine. A GPU asked for where there is none (or in a build
without CUDA) is a clear error at start, never a crash; bad values name the setting; and the CPU
path keeps working right after each refusal. (The GPU side of the same flags is checked by
tests/gpu/run.sh on a machine with a GPU.)"""
import subprocess

from conftest import CLEAVE, MODEL, ROOT, offline_generate


def run(*args, timeout=60):
    return subprocess.run([CLEAVE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def generate(*extra):
    return run("generate", "--model", MODEL, "--prompt", "Once upon a time", "--max-tokens", "4",
               "--temperature", "0", "--threads", "1", "--json", *extra)


def test_generate_on_missing_gpu_is_a_clear_error_then_cpu_works():
    out = generate("--device", "cuda:0")
    assert out.returncode != 0
    # CUDA builds see no device; CPU-only builds have no CUDA backend at all.
    assert ("CUDA device 0 requested but 0 device(s) are visible" in out.stderr
            or "has no CUDA backend" in out.stderr), out.stderr
    assert "Segmentation" not in out.stderr and "core dumped" not in out.stderr
    cpu = generate("--device", "cpu")
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.strip(), "no output on the CPU"
    # --device cpu is the default: the same tokens as without the flag.
    assert offline_generate("Once upon a time", 4)["token_ids"] == __import__("json").loads(cpu.stdout)["token_ids"]


def test_bad_device_and_weight_dtype_are_named():
    out = generate("--device", "tpu:0")
    assert out.returncode != 0
    assert "device must be cpu, cuda or cuda:N, not 'tpu:0'" in out.stderr, out.stderr
    out = generate("--weight-dtype", "fp8")
    assert out.returncode != 0
    assert "--weight-dtype must be bf16 or as_stored" in out.stderr, out.stderr
    assert generate().returncode == 0


def worker(*extra):
    # Port 1 on loopback: nothing listens, but every check below fails before the worker dials.
    return run("worker", "--model", MODEL, "--scheduler", "127.0.0.1:1", "--http", "off", *extra, timeout=30)


def test_worker_device_rules():
    out = worker("--role", "decode", "--device", "cuda", "--kv-transport", "tcp")
    assert out.returncode != 0
    assert "a decode worker on a GPU receives KV with kv_transport nccl or cuda-ipc" in out.stderr, out.stderr
    out = worker("--role", "attention", "--afd-group", "g", "--device", "cuda:0")
    assert out.returncode != 0
    assert "the attention and ffn roles run on the CPU for now" in out.stderr, out.stderr
    out = worker("--role", "decode", "--kv-transport", "rdma")
    assert out.returncode != 0
    assert "kv_transport must be tcp, nccl or cuda-ipc, not 'rdma'" in out.stderr, out.stderr
    out = worker("--role", "prefill", "--device", "cuda:3")
    assert out.returncode != 0
    assert ("CUDA device 3 requested but 0 device(s) are visible" in out.stderr
            or "has no CUDA backend" in out.stderr), out.stderr
    # And the CPU path still starts (it then fails only on the unreachable scheduler, later).
    assert generate("--device", "cpu").returncode == 0
