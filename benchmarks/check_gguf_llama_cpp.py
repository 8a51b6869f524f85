"""GGUF export read back by llama.cpp (llama-cpp-python), on the CPU: for tiny random models of each exported
family with their real tokenizers (tests/integration/test_export_gguf.py's CASES), whether llama.cpp's token ids
equal HF's and how far its logits are from HF's fp32 forward, per GGUF type.

    python benchmarks/check_gguf_llama_cpp.py --out benchmarks/results/DATE-cpu-gguf-llama-cpp.json

err: max |llama.cpp logit - HF logit| / max |HF logit| over the text's positions, llama.cpp's KV cache in f32
(its default f16 cache alone adds ~4-7e-4).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    import llama_cpp
    import test_export_gguf as cases

    rows = []
    for case in cases.CASES:
        folder, model, tok = cases._checkpoint(Path(tempfile.mkdtemp()), args.shared, case)
        for outtype in ("f32", "bf16", "f16", "q8_0"):
            for _, ids, same, err in cases.llama_cpp_reads(folder, model, tok, outtype):
                rows.append({"case": case, "type": outtype, "tokens": len(ids), "same_ids": same, "err": err})
                print(f"{case:8} {outtype:5} {len(ids):3} tokens  ids equal {same}  err {err:.2e}")
    args.out.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
