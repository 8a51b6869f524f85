"""A merged model's decode step replayed from the CUDA graph, the model's own layers against ppalli's decode layers
(ppalli/infer/decode_layers.py): milliseconds a step, kernels a step and their device time, and the kernel table.

    python benchmarks/bench_decode_layers.py --model CONFIG.json [--slots 256] [--prompt 64] --out profile.txt

Random weights from the config with a merged random LoRA (bench_generate.lora_model; --nf4: an NF4 base with the
adapter apart), bf16, one row, a --prompt
token prompt, --slots cache slots (a long chat: a long prompt in a large cache); 5 warm-up steps, 50 timed, 20 under
the profiler.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import lora_model  # noqa: E402

from ppalli.export.merge import merge_for_inference  # noqa: E402
from ppalli.infer.decode_layers import decode_layers  # noqa: E402
from ppalli.infer.graph import StaticDecoder  # noqa: E402


def measure(model, fast: bool, slots: int, prompt_len: int, lines: list[str]) -> None:
    device = torch.device("cuda")
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    with torch.inference_mode(), decode_layers(model, enabled=fast, log=lines.append):
        decoder = StaticDecoder(model, slots, device, graph=True)
        token = decoder.prefill(prompt).argmax(-1, keepdim=True)
        for _ in range(5):
            token = decoder(token).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(50):
            token = decoder(token).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        lines.append(f"decode layers={fast}: {(time.perf_counter() - start) / 50 * 1e3:.3f} ms a step (graph)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                token = decoder(token).argmax(-1, keepdim=True)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 20 / 1e3
    lines.append(f"  kernels: {len(kernels) / 20:.0f} a step, {busy:.3f} ms a step")
    lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a config.json")
    parser.add_argument("--slots", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--nf4", action="store_true", help="a QLoRA model: NF4 base, the adapter kept apart")
    args = parser.parse_args()
    model = merge_for_inference(lora_model(args.model, "cuda", torch.bfloat16, args.nf4))[0]  # 4-bit: not merged
    lines: list[str] = [f"{torch.cuda.get_device_name()}, {args.model}, torch {torch.__version__}, {args.slots} "
                        f"slots, {args.prompt}-token prompt"]
    for fast in (False, True):
        measure(model, fast, args.slots, args.prompt, lines)
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
