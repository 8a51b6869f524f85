"""Time ppalli's 4-bit dequantize against bitsandbytes.functional.dequantize_4bit on one GPU.

    python benchmarks/bench_nf4.py --out benchmarks/results/nf4.json

Shapes are Llama-3.1-8B's projections (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336)
and Llama-3.1-70B's gate/up (28672x8192). Each case is checked bit for bit against bnb before it is timed.
Times are medians of triton.testing.do_bench (ms); GB/s counts the bytes each call must move: packed codes
(n/2), scales (fp32 absmax, or uint8 codes plus the nested fp32 absmax) and the output (n * 2 for bf16).
ppalli's kernel is timed at every --block-bytes value; "ppalli" is the default BLOCK_BYTES, and the sweep
shows whether another value should become the default (the ratio to bnb is the figure to read).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402

from ppalli.kernels import nf4  # noqa: E402

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (28672, 8192))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _median_ms(fn) -> float:
    return triton.testing.do_bench(fn, return_mode="median")


def _bytes_moved(n: int, qs, out_dtype: torch.dtype) -> int:
    scales = qs.absmax.numel() * qs.absmax.element_size()
    if qs.nested:
        scales += qs.state2.absmax.numel() * 4 + 256 * 4
    return n // 2 + scales + n * torch.empty((), dtype=out_dtype).element_size()


def _case(shape, dtype, quant_type, double_quant, block_sizes):
    w = torch.randn(shape, device="cuda", dtype=dtype)
    packed, qs = F.quantize_4bit(w, quant_type=quant_type, compress_statistics=double_quant)
    want = F.dequantize_4bit(packed, qs)
    got = nf4.dequantize_nf4(packed, qs)
    if not torch.equal(got.view(torch.int16), want.view(torch.int16)):
        raise SystemExit(f"{shape} {dtype} {quant_type} dq={double_quant}: ppalli differs from bitsandbytes")
    state = nf4._read_state(packed, qs, None)  # the launcher's input, to time other block sizes
    moved = _bytes_moved(w.numel(), qs, dtype)
    bnb_ms = _median_ms(lambda: F.dequantize_4bit(packed, qs))
    sweep = {b: _median_ms(lambda b=b: nf4._launch(state, b)) for b in block_sizes}
    ours_ms = _median_ms(lambda: nf4.dequantize_nf4(packed, qs))
    return {
        "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "quant_type": quant_type,
        "double_quant": double_quant, "bytes_moved": moved,
        "bnb_ms": bnb_ms, "ppalli_ms": ours_ms, "speedup_vs_bnb": bnb_ms / ours_ms,
        "bnb_gbps": moved / bnb_ms / 1e6, "ppalli_gbps": moved / ours_ms / 1e6,
        "ppalli_ms_by_block_bytes": {str(b): ms for b, ms in sweep.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=list(DTYPES))
    ap.add_argument("--quant-types", nargs="+", default=["nf4", "fp4"], choices=["nf4", "fp4"])
    ap.add_argument("--block-bytes", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    args = ap.parse_args()
    rows = []
    for shape in SHAPES:
        for dtype in args.dtypes:
            for quant_type in args.quant_types:
                for double_quant in (True, False):
                    r = _case(shape, DTYPES[dtype], quant_type, double_quant, args.block_bytes)
                    rows.append(r)
                    print(f"{str(tuple(shape)):>14} {dtype} {quant_type} dq={int(double_quant)}  bnb "
                          f"{r['bnb_ms']:.4f} ms {r['bnb_gbps']:6.0f} GB/s  ppalli {r['ppalli_ms']:.4f} ms "
                          f"{r['ppalli_gbps']:6.0f} GB/s  x{r['speedup_vs_bnb']:.2f}  sweep "
                          + " ".join(f"{b}:{ms:.4f}" for b, ms in r["ppalli_ms_by_block_bytes"].items()))
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "bitsandbytes": bnb.__version__, "default_block_bytes": nf4.BLOCK_BYTES, "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
