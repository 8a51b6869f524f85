"""What-if plans for a machine that is not this one ("would Llama-3.1-8B fit a 4090?"), and plain-text plan tables."""

from __future__ import annotations

import textwrap

from ppalli.config import Config
from ppalli.env import GPU, Environment
from ppalli.errors import PpalliError
from ppalli.plan.gpus import lookup_gpu
from ppalli.plan.memory import GIB, ModelSpec
from ppalli.plan.planner import CHOICES, NOTES, Plan, _show, make_plan

# A standard ppalli install with its fast and qlora extras (pyproject.toml); versions are the tested minimums.
ASSUMED_PACKAGES = {"transformers": "5.17.0", "peft": "0.21.0", "triton": "3.6.0", "bitsandbytes": "0.45.0"}


def whatif_env(gpu: str | None = None, gpu_memory_gib: float | None = None,
               capability: tuple[int, int] | None = None, packages: dict[str, str] | None = None) -> Environment:
    """An Environment with one GPU taken from the card table (memory and capability may override it), a GPU
    described by memory and capability alone, or no GPU at all."""
    pkgs = dict(ASSUMED_PACKAGES if packages is None else packages)
    if gpu is None and gpu_memory_gib is None:
        return Environment(torch="assumed", packages=pkgs)
    if gpu is None:
        if capability is None:
            raise PpalliError("a what-if GPU given by memory needs its compute capability too, e.g. (8, 6)")
        name = f"GPU with {gpu_memory_gib:g} GiB"
    else:
        card = lookup_gpu(gpu, gpu_memory_gib)
        name, capability = card.name, capability or card.capability
        gpu_memory_gib = gpu_memory_gib or card.memory_gib
    capability = (int(capability[0]), int(capability[1]))
    device = GPU(name=name, capability=capability, total_memory_bytes=int(gpu_memory_gib * GIB),
                 bf16=capability >= (8, 0))
    return Environment(torch="assumed", cuda="assumed", gpus=(device,), packages=pkgs)


def whatif(cfg: Config, spec: ModelSpec, *, gpu: str | None = None, gpu_memory_gib: float | None = None,
           capability: tuple[int, int] | None = None, packages: dict[str, str] | None = None,
           longest_row: int | None = None, step_tokens: int | None = None) -> Plan:
    """The plan ppalli would make on that machine (assuming its standard install unless `packages` says), for
    data of those lengths when given (recipe.data_shape)."""
    return make_plan(whatif_env(gpu, gpu_memory_gib, capability, packages), cfg, spec, longest_row=longest_row,
                     step_tokens=step_tokens)


def format_plan(plan: Plan, width: int = 110) -> str:
    """A plain-text table (choice, value, reason) and the memory and speed lines; no rich, no colour."""
    rows = [(name.replace("_", " "), _show(name, plan), plan.reasons.get(name, "")) for name in CHOICES]
    w1 = max(len(r[0]) for r in rows + [("choice", "", "")])
    w2 = max(len(r[1]) for r in rows + [("", "value", "")])
    reason_width = max(30, width - w1 - w2 - 4)
    lines = [f"{'choice':<{w1}}  {'value':<{w2}}  reason", f"{'-' * w1}  {'-' * w2}  {'-' * reason_width}"]
    for choice, value, reason in rows:
        wrapped = textwrap.wrap(reason, reason_width) or [""]
        lines.append(f"{choice:<{w1}}  {value:<{w2}}  {wrapped[0]}")
        lines.extend(f"{'':<{w1}}  {'':<{w2}}  {more}" for more in wrapped[1:])
    lines.append("")
    for key in NOTES:
        if key in plan.reasons:
            lines.extend(textwrap.wrap(f"{key}: {plan.reasons[key]}", width, subsequent_indent="  "))
    return "\n".join(lines)
