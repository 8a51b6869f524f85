"""What holding rows to a grammar costs a decode step (infer/structured.py): the host's work (each row's matcher
fills its bitmask, then takes the picked token) and the mask applied to a copy of the (B, V) logits, on the real Qwen2.5
vocabulary (151,936 rows), for a JSON schema, a forced call and "auto" tool text. The rows walk a valid answer
token by token, so each step's matcher state is one a real answer passes through.

    python benchmarks/bench_structured.py --out benchmarks/results/DATE-cpu-structured.json [--rows 1 8 16]
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppalli.data.templates import resolve_template  # noqa: E402
from ppalli.infer.structured import Grammars, RowGrammars  # noqa: E402
from ppalli.models.tokenizer import load_tokenizer  # noqa: E402

VOCAB = 151936
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                           "units": {"enum": ["metric", "imperial"]}},
          "required": ["city", "days", "units"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}
CASES = {  # name: (grammar request, a valid answer the rows walk)
    "json_schema": ((SCHEMA, None, None), '{"city": "서울특별시 종로구", "days": 14, "units": "metric"}'),
    "forced_call": ((None, [WEATHER], "get_weather"), '<tool_call>\n{"name": "get_weather", "arguments": '
                    '{"city": "서울특별시 종로구", "days": 14, "units": "metric"}}\n</tool_call>'),
    "auto_text": ((None, [WEATHER], None), "서울은 오늘 맑고 낮 기온은 영상 3도, 내일은 흐리고 비가 조금 오겠습니다."),
}


def time_case(grammars: Grammars, tok, request, text: str, rows: int, device: str) -> dict:
    grammar = grammars.for_request(*request)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    logits = torch.randn(rows, VOCAB, device=device)
    best = None
    for _ in range(3):
        held = RowGrammars([grammar] * rows, {stop}, rows)
        open_rows = [True] * rows
        host = mask = fill = 0.0
        for token in ids:
            start = time.perf_counter()  # the host's share alone: each row's bitmask filled (mask fills it again)
            for row, matcher in enumerate(held.matchers):
                matcher.fill_next_token_bitmask(held.bitmask, row)
            fill += time.perf_counter() - start
            start = time.perf_counter()
            masked = held.mask(logits, [False] * rows)
            if device == "cuda":
                torch.cuda.synchronize()
            mask += time.perf_counter() - start
            start = time.perf_counter()
            held.accept([token] * rows, open_rows)
            host += time.perf_counter() - start
        assert torch.isfinite(masked).any()
        step = (mask + host) / len(ids) * 1e3
        if best is None or step < best["ms_per_step"]:
            best = {"rows": rows, "tokens": len(ids), "ms_per_step": round(step, 4),
                    "mask_ms": round(mask / len(ids) * 1e3, 4), "fill_ms": round(fill / len(ids) * 1e3, 4),
                    "accept_ms": round(host / len(ids) * 1e3, 4)}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    tok = load_tokenizer(args.shared / "tokenizer_qwen2.5")
    start = time.perf_counter()
    grammars = Grammars(tok, VOCAB, resolve_template("auto", tok))
    grammars.compiler()
    setup = time.perf_counter() - start
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for name, (request, text) in CASES.items():
        start = time.perf_counter()
        grammars.for_request(*request)
        compile_ms = (time.perf_counter() - start) * 1e3
        for rows in args.rows:
            row = {"case": name, "compile_ms": round(compile_ms, 1), **time_case(grammars, tok, request, text, rows,
                                                                                device)}
            results.append(row)
            print(f"{name:12} rows {rows:3}: {row['ms_per_step']:.3f} ms a step (mask {row['mask_ms']:.3f}, of it the "
                  f"bitmasks' fill {row['fill_ms']:.3f}; accept {row['accept_ms']:.3f}) over {row['tokens']} tokens; "
                  f"grammar compiled in {compile_ms:.1f} ms")
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "vocab": VOCAB, "tokenizer_info_s": round(setup, 2), "results": results}
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    print(f"vocabulary read in {setup:.2f} s; written {args.out}")


if __name__ == "__main__":
    main()
