"""What a decoding step's matrix products cost on this CPU, apart from everything else: the
products of SmolLM2-135M's 30 layers (q/k/v and gate/up as one product each) and its output
head at batch 16 in bf16, each weight used once per step, so read from memory as in
generation; through libtorch's linear (oneDNN) and through MKL's cblas_gemm_bf16bf16f32;
beside the rate of a plain read of memory. docs/BENCHMARKS.md, "What bounds generation on the
CPU".

    python scripts/decode_products.py [--rounds 4]
"""
import argparse
import ctypes
import os
import time

import torch

H, F, LAYERS, VOCAB, ROWS = 576, 1536, 30, 49152, 16


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i, dtype=torch.bfloat16) * 0.05
               for _ in range(LAYERS) for o, i in [(960, H), (H, H), (2 * F, H), (H, F)]]
    weights.append(torch.randn(VOCAB, H, dtype=torch.bfloat16) * 0.05)
    x = {k: torch.randn(ROWS, k, dtype=torch.bfloat16) for k in (H, F)}
    nbytes = sum(w.numel() * w.element_size() for w in weights)

    mkl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    gemm = getattr(mkl, "cblas_gemm_bf16bf16f32", None)
    if gemm is not None:
        i = ctypes.c_int
        gemm.argtypes = [i, i, i, i, i, i, ctypes.c_float, ctypes.c_void_p, i, ctypes.c_void_p, i, ctypes.c_float,
                         ctypes.c_void_p, i]

    def onednn(w):
        return torch.nn.functional.linear(x[w.shape[1]], w)

    def mkl_bf16(w):
        n, k = w.shape
        out = torch.empty(ROWS, n)
        # row-major; C[ROWS, n] = X[ROWS, k] @ W[n, k]^T, accumulated and written in fp32
        gemm(101, 111, 112, ROWS, n, k, 1.0, x[k].data_ptr(), k, w.data_ptr(), k, 0.0, out.data_ptr(), n)
        return out

    sides = [("libtorch linear (oneDNN)", onednn)] + ([("MKL cblas_gemm_bf16bf16f32", mkl_bf16)] if gemm else [])
    err = (mkl_bf16(weights[0]) - onednn(weights[0]).float()).abs().max().item() if gemm else 0.0
    print(f"weights read per step: {nbytes / 1e6:.0f} MB; largest difference between the two products: {err:.3g} "
          "(oneDNN rounds its output to bf16, MKL writes fp32)")
    block = torch.ones(512 * 2 ** 20, dtype=torch.uint8)
    for r in range(a.rounds):
        for name, f in sides:
            t0 = time.perf_counter()
            for w in weights:
                f(w)
            dt = time.perf_counter() - t0
            print(f"round {r + 1}: {name}: {dt * 1e3:.1f} ms a step, {nbytes / dt / 1e9:.1f} GB/s of weights")
        t0 = time.perf_counter()
        block.view(torch.int64).sum()
        print(f"round {r + 1}: plain read of 512 MiB: {block.numel() / (time.perf_counter() - t0) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
