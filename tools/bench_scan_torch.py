"""The PyTorch baseline for tests/gpu/cuda_ssm_bench.cc: the selective scan as a plain per-timestep
torch loop (transformers' MambaMixer slow path, one step at a time), on the bench's shape
(batch 8, length 4096, d_inner 2048, d_state 16, with dt_bias, D and z), on CUDA when torch sees
a GPU, else on the CPU. Prints one line:

    torch_loop_seconds X device D

X: wall seconds of one full scan (after a short warm-up), which cuda_ssm_bench takes as
--torch-seconds X. tests/gpu/run.sh wires the two together. Usage:
    python tools/bench_scan_torch.py [--batch 8] [--length 4096] [--d-inner 2048] [--d-state 16]
                                     [--device cuda|cpu]
"""
import argparse
import time

import torch


def scan_loop(x, dt, dt_bias, a, b, c, d, z):
    """y[b, t, :] and the final state, one timestep per iteration; f32 throughout."""
    delta = torch.nn.functional.softplus(dt + dt_bias)  # [batch, length, d_inner]
    h = torch.zeros(x.shape[0], x.shape[2], a.shape[1], device=x.device, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        d_t = delta[:, t, :, None]  # [batch, d_inner, 1]
        h = torch.exp(d_t * a) * h + (d_t * b[:, t, None, :]) * x[:, t, :, None]
        ys.append(torch.matmul(h, c[:, t, :, None])[..., 0])  # [batch, d_inner]
    y = torch.stack(ys, dim=1) + x * d
    return y * torch.nn.functional.silu(z), h


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--d-inner", type=int, default=2048)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    bsz, length, d_inner, d_state = args.batch, args.length, args.d_inner, args.d_state
    x = rand(bsz, length, d_inner)
    dt = rand(bsz, length, d_inner)
    z = rand(bsz, length, d_inner)
    b = rand(bsz, length, d_state)
    c = rand(bsz, length, d_state)
    dt_bias = rand(d_inner) - 3.0
    a = -torch.exp(rand(d_inner, d_state, scale=0.5))
    d = rand(d_inner)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        warm = min(length, 16)
        scan_loop(x[:, :warm], dt[:, :warm], dt_bias, a, b[:, :warm], c[:, :warm], d, z[:, :warm])
        sync()
        start = time.perf_counter()
        scan_loop(x, dt, dt_bias, a, b, c, d, z)
        sync()
        seconds = time.perf_counter() - start
    print(f"torch_loop_seconds {seconds:.6f} device {device}")


if __name__ == "__main__":
    main()
