"""The rows of peers.py's results table: ppalli's reference run, ratios against it, and the clock, power and
energy per token of runs that logged them. Pure (no torch), like peers.py itself."""

from __future__ import annotations

import statistics


def ok(run: dict) -> bool:
    return not run.get("error") and bool(run.get("tokens_per_s"))


def reference_ppalli(runs: list[dict]) -> dict | None:
    """ppalli's own plan (requested 'auto') when it ran, else its fastest run."""
    mine = [r for r in runs if r["stack"] == "ppalli" and ok(r)]
    own = [r for r in mine if r.get("requested", "auto") == "auto"]
    return max(own or mine, key=lambda r: r["tokens_per_s"], default=None)


def fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table_row(run: dict, ref: dict | None) -> str:
    if not ok(run):
        err = str(run.get("error", "no result")).replace("|", "/")[:160]
        return f"| {run['stack']} | {run['setting']} | {run['batch']}x{run['seq']} | failed: {err} | | | | | | |"
    ref_tps, ref_peak = (ref["tokens_per_s"], ref["peak_gib"]) if ref else (None, None)
    loss = f"{fmt(run.get('loss_first'), '.3f')} -> {fmt(run.get('loss_last'), '.3f')}"
    return (f"| {run['stack']} | {run['setting']} | {run['batch']}x{run['seq']} | {run['tokens_per_s']:,.0f} | "
            f"{fmt(run.get('step_ms'), '.1f')} | {fmt(run.get('peak_gib'), '.2f')} | "
            f"{run['share_of_peak']:.1%} | {loss} | {_ratio(ref_tps, run['tokens_per_s'])} | "
            f"{_ratio(ref_peak, run.get('peak_gib'))} |")


def power_summary(run: dict) -> dict | None:
    """Medians over the timed steps of the SM clock (MHz) and power (W) nvidia-smi read beside them, the share
    of samples under the software power cap, and the energy per token (mJ: a step's power x its time over
    its tokens; from the instant power where it was logged, the 1 s average lags a step). On the H200
    (2026-12-02) every stack ran at the 700 W cap in every step, so a stack's speed there follows its energy
    per token: two stacks' ratio is read beside these. None without clock samples."""
    clocks, steps = (run.get("step_detail") or {}).get("clocks"), run.get("step_ms_all")
    if not clocks or not steps:
        return None
    tokens = run["batch"] * run["seq"]
    instant = clocks.get("power_instant_w") or [None] * len(steps)
    rows = [(mhz, w, cap, (iw or w) * ms / tokens)  # W x ms = mJ
            for mhz, w, cap, iw, ms in zip(clocks["sm_mhz"], clocks["power_w"], clocks["power_capped"], instant,
                                           steps)
            if w is not None]  # None: no sample fell inside that step
    if not rows:
        return None
    mhz, watts, capped, mj = zip(*rows)
    out = {"sm_mhz": statistics.median(mhz), "power_w": round(statistics.median(watts), 1),
           "power_capped": round(statistics.fmean(capped), 2), "mj_per_token": round(statistics.median(mj), 3)}
    for key in ("power_instant_w", "temp_c"):  # logged from 2026-12-02's seventh session on
        values = [v for v in clocks.get(key) or [] if v is not None]
        if values:
            out[key] = round(statistics.median(values), 1)
    return out


def power_table(runs: list[dict]) -> list[str]:
    """Clock, power and energy per token of the runs that logged them (power_summary), else nothing."""
    rows = [(r, r["power"]) for r in runs if ok(r) and r.get("power")]
    if not rows:
        return []
    lines = ["", "Medians over the timed steps (nvidia-smi beside them); energy per token = a step's power x its "
             "time / its tokens.", "",
             "| stack | setting | SM MHz | power W (1 s average) | instant W | GPU C | steps at the power cap | "
             "energy mJ / token |", "|---|---|---|---|---|---|---|---|"]
    return lines + [f"| {r['stack']} | {r['setting']} | {p['sm_mhz']:.0f} | {p['power_w']:.0f} | "
                    f"{_opt(p.get('power_instant_w'))} | {_opt(p.get('temp_c'))} | {p['power_capped']:.0%} | "
                    f"{p['mj_per_token']:.2f} |" for r, p in rows]


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
