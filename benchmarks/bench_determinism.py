"""Which attention kernels give bit-repeatable gradients, and what each costs, on one GPU.

    python benchmarks/bench_determinism.py --out benchmarks/results/determinism.json

For each SDPA kernel (GQA native, or k/v expanded to all heads where the kernel refuses GQA) and torch's
varlen_attn, with torch.use_deterministic_algorithms off and on: the forward + backward run REPEATS times on
the same inputs, and the row says whether every run's output and gradients equal the first's bit for bit,
the time (median of triton.testing.do_bench), or the error the kernel raised. Shapes as bench_attention.py:
Llama-3.1-8B's (T1) and Llama-3.2-1B's (T4), bf16. The plan's `deterministic` switch picks its attention
kernel from these rows.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: torch asks for it when deterministic

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _sweep import main, median_ms  # noqa: E402

SHAPES = {"8b": (4, 32, 8, 2048, 128), "1b": (8, 32, 8, 2048, 64)}  # batch, heads, kv heads, seq, head dim
REPEATS = 4


def _sdpa(name: str, expand: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        if expand:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        with sdpa_kernel([getattr(SDPBackend, name)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand).transpose(1, 2)
    return run


def _varlen(q, k, v):  # (B, T, Hq, D), as the SDPA rows after their transpose
    from ppalli.models.attention import _varlen_torch

    b, _, s, _ = q.shape
    cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
    return _varlen_torch(q, k, v, None, None, cu, s)


KERNELS = {"cudnn": _sdpa("CUDNN_ATTENTION", False), "flash": _sdpa("FLASH_ATTENTION", False),
           "efficient (k/v expanded)": _sdpa("EFFICIENT_ATTENTION", True),
           "flash (k/v expanded)": _sdpa("FLASH_ATTENTION", True), "varlen_attn": _varlen}


def _grads(fn, q, k, v, dout):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _row(fn, q, k, v, dout, deterministic: bool) -> dict:
    torch.use_deterministic_algorithms(deterministic)
    try:
        first = _grads(fn, q, k, v, dout)
        same = all(all(torch.equal(a, b) for a, b in zip(first, _grads(fn, q, k, v, dout)))
                   for _ in range(REPEATS - 1))
        ms = median_ms(lambda: _grads(fn, q, k, v, dout))
    except Exception as e:  # noqa: BLE001 - a kernel refusing the mode is a result
        return {"deterministic_mode": deterministic, "error": f"{type(e).__name__}: {e}"[:240]}
    finally:
        torch.use_deterministic_algorithms(False)
    return {"deterministic_mode": deterministic, "bit_repeatable": same, "ms": round(ms, 3)}


def bench_shape(name, b, h, hk, s, d) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v, dout = t(b, h, s, d), t(b, hk, s, d), t(b, hk, s, d), t(b, s, h, d)
    rows = []
    for kname, fn in KERNELS.items():
        for det in (False, True):
            rows.append({"kernel": kname, **_row(fn, q, k, v, dout, det)})
    return {"shape": name, "b": b, "h": h, "hk": hk, "s": s, "d": d, "rows": rows}


def report(r: dict) -> None:
    print(f"{r['shape']}: {r['b']} x {r['h']} heads ({r['hk']} kv) x {r['s']} x {r['d']}, {REPEATS} runs each")
    for x in r["rows"]:
        mode = "deterministic mode" if x["deterministic_mode"] else "default mode      "
        what = x.get("error") or f"bit-repeatable {x['bit_repeatable']}, {x['ms']:.3f} ms"
        print(f"  {x['kernel']:26s} {mode} {what}")


if __name__ == "__main__":
    main(__doc__, SHAPES, bench_shape, report)
