"""The attention backend of a plan: a pinned one checked against the GPU and the packages installed, or the
automatic choice per GPU generation with the measurement behind it (ppalli/plan/planner.py calls attention_choice)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ppalli.errors import PpalliError
from ppalli.plan.switches import NO_SDPA_FAMILIES

if TYPE_CHECKING:
    from ppalli.plan.planner import _Ctx

FA4_INSTALL = "pip install 'ppalli[fa4]'"  # pyproject's extra: the flash-attn-4 version tests/gpu ran


def _attention_problem(name: str, ctx: _Ctx) -> str | None:
    """Why a pinned attention backend cannot run here, or None."""
    cc = ctx.gpu.capability if ctx.gpu else None
    if name == "flash_attention_2":
        if cc is None or cc < (8, 0):
            return "FlashAttention 2 needs a CUDA GPU of compute capability 8.0+"
        if not ctx.env.has("flash_attn"):
            return "flash-attn is not installed (pip install flash-attn --no-build-isolation)"
    if name == "flash_attention_3":
        if cc is None or cc[0] != 9:
            return "FlashAttention 3 needs a Hopper GPU (compute capability 9.x)"
        if not ctx.env.has("flash_attn_3"):
            return "flash-attn 3 is not installed (build it from flash-attention's hopper/ folder)"
    if name == "flash_attention_4":
        if cc is None or cc < (8, 0):
            return "FlashAttention 4 needs a CUDA GPU of compute capability 8.0+"
        if not ctx.env.has("flash_attn_4"):
            return f"flash-attn 4 is not installed ({FA4_INSTALL})"
    return None


def attention_choice(ctx: _Ctx, fast_path_blockers: list[str]) -> str:
    """The attention backend: the pinned one where it can run (else an error), or the automatic choice with its
    reason. fast_path_blockers: why the fused path could not run (flash-attn 4 runs in its layers only)."""
    want = ctx.cfg.plan.attention
    if want != "auto":
        problem = _attention_problem(want, ctx)
        if problem:
            raise PpalliError(f"plan.attention={want}: {problem}; or set plan.attention=auto")
        ctx.reasons["attention"] = ctx.pin("attention", "plan.attention", want)
        return want
    name, why = _auto_attention(ctx, fast_path_blockers)
    if ctx.spec.family in NO_SDPA_FAMILIES:
        why += (f"; {ctx.spec.family}'s attention logit softcap has no SDPA kernel: the fused path runs it in "
                "flex_attention on a GPU (flash-attn when installed), the reference path in HF's eager attention")
    if ctx.cfg.plan.deterministic and name == "sdpa" and ctx.gpu and ctx.gpu.capability >= (8, 0):
        why += "; plan.deterministic: its flash kernel, whose backward is bit-repeatable"
    ctx.reasons["attention"] = why
    return name


def _auto_attention(ctx: _Ctx, fast_path_blockers: list[str]) -> tuple[str, str]:
    cc = ctx.gpu.capability if ctx.gpu else None
    if cc is None:
        return "sdpa", f"PyTorch SDPA: the fused attention available on {ctx.device}"
    if cc[0] == 9 and ctx.env.has("flash_attn_3"):
        return "flash_attention_3", "FlashAttention 3 is installed and this is a Hopper GPU"
    kept = _fa4_kept_out(ctx, fast_path_blockers) if cc[0] == 9 else None
    if cc[0] == 9 and ctx.env.has("flash_attn_4") and kept is None:
        return "flash_attention_4", FA4_WHY
    if cc[0] == 9:
        why = ("SDPA: on Hopper its cuDNN kernel ran 1.6x its flash (FA2) kernel on 8B shapes (BENCHMARKS.md); "
               "flash-attn 3 is not installed")
        if ctx.env.has("flash_attn_4"):
            why += f"; flash-attn 4 is, and runs when pinned (plan.attention=flash_attention_4), not here: {kept}"
        elif kept is None:  # T1 (8B LoRA 4 x 2048, H100, 2026-12-05/06): 2.2-2.6% more tokens/s than with cuDNN
            why += f"; flash-attn 4 would run here, faster ({FA4_INSTALL})"
        return "sdpa", why
    if cc >= (8, 0) and ctx.env.has("flash_attn"):
        return "flash_attention_2", "FlashAttention 2 is installed (capability 8.x): varlen kernels, no masks"
    if cc >= (8, 0):
        return "sdpa", "SDPA picks its flash or memory-efficient kernel; flash-attn is not installed"
    return "sdpa", f"SDPA: FlashAttention needs compute capability 8.0+, this GPU is {ctx.gpu.capability_str}"


# Measured on an H200 (2026-12-05, benchmarks/results/2026-12-05-h200-fa4-*): flash-attn 4.0.0b40 against SDPA's
# cuDNN kernel, causal GQA forward + backward, and T4's whole step (ppalli's fused path, two calls). A packed SFT
# run (benchmarks/check_fa4_packed.py, H100, 2026-12-05, results/2026-12-05-h100-fa4-packed.json: Llama-3.2-1B,
# ko_chatbot_qa, 60 steps of varlen batches) compiled 2 forward and 1 backward kernels: step 1 took 18.8 s (the
# Triton kernels' compiles too), step 11 3.8 s, the other 58 steps 79-207 ms (median 91.7).
FA4_WHY = ("flash-attn 4 is installed and this is a Hopper GPU: its forward + backward took 1.26 ms against SDPA "
           "cuDNN's 1.44 at Llama-3.2-1B's shapes (8 x 32 heads x 2048 x 64) and 1.06 against 1.17 at 8B's (4 x 32 x "
           "2048 x 128), H200; a Llama-3.2-1B 8 x 2048 LoRA step 173.4 -> 169.8 ms. Its first call per kernel "
           "configuration compiles (5-8 s; a 60-step packed run compiled 2 forward and 1 backward kernels, H100)")


def _fa4_kept_out(ctx: _Ctx, blockers: list[str]) -> str | None:
    """Why flash-attn 4, installed, is not the automatic choice here, or None. It runs in the fused layers only
    (the reference path would run SDPA anyway), and its deterministic backward was never measured here."""
    if ctx.cfg.plan.fast_path == "off":
        return "plan.fast_path=off, and it runs in the fused layers only"
    if blockers:
        return f"it runs in the fused layers only, and the reference path runs ({blockers[0]})"
    if ctx.cfg.plan.deterministic:
        return "plan.deterministic keeps SDPA's flash kernel, whose repeatable backward was measured"
    return None
