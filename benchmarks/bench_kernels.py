"""Time each fused kernel against its PyTorch reference on one GPU, and the peak memory of fused vs plain CE.

    python benchmarks/bench_kernels.py --out benchmarks/results/kernels.json

Shapes are Llama-3.1-8B's at 4x2048 tokens (hidden 4096, 32/8 heads of 128, intermediate 14336, vocab
128256) in bf16. Times are medians of triton.testing.do_bench (ms); "fwd+bwd" times the forward and the
backward together. The baselines are the eager ops HF's modeling code runs without the fast path (RMSNorm
upcast to fp32, rope and the GLUs in bf16); ratios are the figures to read, as DESIGN.md says.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
from ppalli.kernels.geglu import geglu  # noqa: E402
from ppalli.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from ppalli.kernels.lora_glu import lora_glu_bwd, lora_glu_fwd  # noqa: E402
from ppalli.kernels.rms_norm import rms_norm  # noqa: E402
from ppalli.kernels.rope import apply_rope  # noqa: E402
from ppalli.kernels.swiglu import swiglu, swiglu_bwd, swiglu_fwd  # noqa: E402

TOKENS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB = 8192, 4096, 32, 8, 128, 14336, 128256
DTYPE = torch.bfloat16


def hf_rms_norm(x, weight, eps):
    """LlamaRMSNorm.forward."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def hf_rope(q, k, cos, sin):
    """apply_rotary_pos_emb with unsqueeze_dim=1, in the input dtype."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def hf_cos_sin(t, head_dim, base):
    """LlamaRotaryEmbedding (default rope) for positions 0..t-1 -> cos, sin (1, T, D) in DTYPE."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device="cuda", dtype=torch.float32) / head_dim)
    freqs = torch.arange(t, device="cuda", dtype=torch.float32)[:, None] * inv_freq  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos().to(DTYPE), emb.sin().to(DTYPE)


def _median_ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def _forward_ms(fn, inputs) -> float:
    with torch.no_grad():
        return _median_ms(lambda: fn(*inputs))


def _fwd_bwd(fn, inputs, grad_out=None):
    """A closure running fn forward and backward on the inputs (their grads reset each time)."""

    def run():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, grad_out)

    return run


def _cases():
    """(name, fused fn, HF's eager fn, inputs, grad_out) per op, on the bf16 Llama-3.1-8B shapes."""
    x = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    w_norm = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)  # frozen, as under LoRA
    q = torch.randn(4, 2048, HEADS, HEAD_DIM, device="cuda", dtype=DTYPE).transpose(1, 2).requires_grad_()
    k = torch.randn(4, 2048, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE).transpose(1, 2).requires_grad_()
    cos, sin = hf_cos_sin(2048, HEAD_DIM, 500000.0)
    gate = torch.randn(TOKENS, INTER, device="cuda", dtype=DTYPE, requires_grad=True)
    up = torch.randn(TOKENS, INTER, device="cuda", dtype=DTYPE, requires_grad=True)
    glu_grad = (torch.randn_like(gate),)
    return [
        ("rms_norm", lambda a: rms_norm(a, w_norm, 1e-5), lambda a: hf_rms_norm(a, w_norm, 1e-5), [x],
         (torch.randn_like(x),)),
        ("rope", lambda a, b: apply_rope(a, b, cos, sin), lambda a, b: hf_rope(a, b, cos, sin), [q, k],
         (torch.randn_like(q), torch.randn_like(k))),
        ("swiglu", swiglu, lambda g, u: F.silu(g) * u, [gate, up], glu_grad),
        ("geglu", geglu, lambda g, u: F.gelu(g, approximate="tanh") * u, [gate, up], glu_grad),
    ]


def _ce_inputs():
    hidden = torch.randn(TOKENS, HIDDEN, device="cuda", dtype=DTYPE, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=DTYPE) * 2 / HIDDEN**0.5  # frozen lm_head
    labels = torch.randint(0, VOCAB, (TOKENS,), device="cuda")
    return hidden, weight, labels


def _plain_ce(hidden, weight, labels):
    """HF's plain path: the full logits in bf16, upcast to fp32, then cross entropy."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, reduction="mean")


def _peak_extra_mib(run) -> float:
    """Peak memory allocated by run() above what was allocated before it, in MiB."""
    run()  # warm-up: cuBLAS workspaces and Triton compilation outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_ops() -> list[dict]:
    rows = []
    for name, fused, ref, inputs, grad_out in _cases():
        fwd = (_forward_ms(fused, inputs), _forward_ms(ref, inputs))
        both = (_median_ms(_fwd_bwd(fused, inputs, grad_out)), _median_ms(_fwd_bwd(ref, inputs, grad_out)))
        rows.append({"op": name, "fwd_ms": fwd[0], "fwd_ref_ms": fwd[1],
                     "fwd_bwd_ms": both[0], "fwd_bwd_ref_ms": both[1]})
    return rows


def bench_lora_glu(rank: int = 16, s: float = 2.0) -> dict:
    """lora_glu (the rank-r terms inside the activation) against what the MLP block ran before it: addmm of
    each s (x A^T) B^T into the base output, SwiGLU; backward: dh += (s dy Bd) Ad, h again, SwiGLU's
    backward in place. The operands as in a Llama-3.1-8B layer at 8192 tokens; GEMMs are not timed."""
    def t(*shape):
        return torch.randn(*shape, device="cuda", dtype=DTYPE)

    g0, u0, dh0 = t(TOKENS, INTER), t(TOKENS, INTER), t(TOKENS, INTER)
    xag, xau, dxad = t(TOKENS, rank), t(TOKENS, rank), t(TOKENS, rank)
    bg, bu, ad = t(INTER, rank), t(INTER, rank), t(rank, INTER)

    def before_fwd():
        g, u = g0.addmm(xag, bg.t(), alpha=s), u0.addmm(xau, bu.t(), alpha=s)
        return swiglu_fwd(g, u), g, u

    def before_bwd(g, u):
        dh = dh0.addmm(dxad, ad)
        h = swiglu_fwd(g, u)
        swiglu_bwd(dh, g, u, inplace=True)
        return h

    _, g, u = before_fwd()
    fwd = _median_ms(lambda: lora_glu_fwd(g0, u0, xag, bg, s, xau, bu, s))
    fwd_ref = _median_ms(before_fwd)
    bwd = _median_ms(lambda: lora_glu_bwd(dh0, g0, u0, xag, bg, s, xau, bu, s, dxad, ad, sums=(True,) * 3))
    bwd_ref = _median_ms(lambda: before_bwd(g, u))  # in place: values drift over repeats, timing does not
    return {"op": f"lora_glu (r={rank})", "fwd_ms": fwd, "fwd_ref_ms": fwd_ref, "fwd_bwd_ms": fwd + bwd,
            "fwd_bwd_ref_ms": fwd_ref + bwd_ref}


def bench_ce() -> dict:
    hidden, weight, labels = _ce_inputs()
    fused = _fwd_bwd(lambda h: linear_cross_entropy(h, weight, labels, reduction="mean"), [hidden])
    plain = _fwd_bwd(lambda h: _plain_ce(h, weight, labels), [hidden])
    row = {"op": "linear_cross_entropy", "fwd_bwd_ms": _median_ms(fused), "fwd_bwd_ref_ms": _median_ms(plain)}
    row["peak_extra_mib"], row["peak_extra_ref_mib"] = _peak_extra_mib(fused), _peak_extra_mib(plain)
    return row


def _print_table(rows: list[dict]) -> None:
    print(f"{'op':<22}{'fwd ms':>10}{'ref':>10}{'x':>7}{'fwd+bwd ms':>12}{'ref':>10}{'x':>7}")
    for r in rows:
        fwd = " " * 27  # the CE row times forward and backward together only: its forward computes the gradients
        if "fwd_ms" in r:
            fwd = f"{r['fwd_ms']:>10.3f}{r['fwd_ref_ms']:>10.3f}{r['fwd_ref_ms'] / r['fwd_ms']:>7.2f}"
        print(f"{r['op']:<22}{fwd}{r['fwd_bwd_ms']:>12.3f}{r['fwd_bwd_ref_ms']:>10.3f}"
              f"{r['fwd_bwd_ref_ms'] / r['fwd_bwd_ms']:>7.2f}")
    ce = rows[-1]
    print(f"CE peak above inputs: fused {ce['peak_extra_mib']:.0f} MiB, plain {ce['peak_extra_ref_mib']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    rows = bench_ops() + [bench_lora_glu(), bench_ce()]
    _print_table(rows)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "dtype": str(DTYPE), "tokens": TOKENS}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
