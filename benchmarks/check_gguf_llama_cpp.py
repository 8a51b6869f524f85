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

import numpy as np
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

    from ppalli.export.gguf import export_gguf

    rows = []
    for case in cases.CASES:
        folder, model, tok = cases._checkpoint(Path(tempfile.mkdtemp()), args.shared, case)
        for outtype in ("f32", "bf16", "f16", "q8_0"):
            llm = llama_cpp.Llama(str(export_gguf(folder, outtype=outtype)), n_ctx=128, logits_all=True,
                                  verbose=False, n_threads=2, type_k=0, type_v=0)  # f32 KV cache
            for text in cases.TEXTS:
                ids = tok(text)["input_ids"]
                same = llm.tokenize(text.encode(), add_bos=tok.bos_token_id is not None, special=True) == ids
                llm.reset()
                llm.eval(ids)
                got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
                with torch.no_grad():
                    want = model(torch.tensor([ids])).logits[0].float().numpy()
                err = float(np.abs(got - want).max() / np.abs(want).max())
                rows.append({"case": case, "type": outtype, "tokens": len(ids), "same_ids": same, "err": err})
                print(f"{case:8} {outtype:5} {len(ids):3} tokens  ids equal {same}  err {err:.2e}")
            llm.close()
    args.out.write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
