"""Ollama Modelfile templates executed by Go's text/template (benchmarks/check_modelfile_go.go, as Ollama's
template.Execute passes .System and .Messages) against the Jinja renders training used, for every built-in template
and tests/integration/test_export_modelfile.py's conversations (Korean, system turns, multi-turn, newlines).

    python benchmarks/check_modelfile_go.py --out benchmarks/results/DATE-cpu-modelfile-go.json   (needs `go`)
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    import test_export_modelfile as cases

    go = subprocess.run(["go", "version"], capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    for name in cases.TOKENIZERS:
        for i, (want, got) in enumerate(cases.jinja_and_go(args.shared, name)):
            rows.append({"template": name, "conversation": i, "equal": want == got, "chars": len(want)})
            print(f"{name:10} conversation {i}: {len(want):4} chars  Go == Jinja {want == got}")
    args.out.write_text(json.dumps({"go": go, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
