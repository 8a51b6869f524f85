"""plan/speed.py's step_seconds, the planner's ranking of plans that fit."""

from ppalli.plan.speed import HOST_SECONDS_PER_LAYER, step_seconds


def _seconds(spec, **kw):
    args = dict(seq_len=2048, batch=4, micro=4, n_lora=42_000_000, checkpointing="none")
    return step_seconds(spec, **(args | kw))


def test_recompute_costs_time_and_more_layers_cost_more(spec_8b):
    times = [_seconds(spec_8b), _seconds(spec_8b, checkpointing="selective", recompute_layers=4),
             _seconds(spec_8b, checkpointing="selective", recompute_layers=20), _seconds(spec_8b, checkpointing="full")]
    assert times == sorted(times) and len(set(times)) == 4


def test_small_micro_batches_of_many_layers_are_bound_by_the_cpu(spec_8b):
    one = _seconds(spec_8b, micro=1)
    assert one == 4 * spec_8b.layers * HOST_SECONDS_PER_LAYER
    assert _seconds(spec_8b, micro=4) < one


def test_4bit_dequantizes_once_per_micro_batch(spec_8b):
    kw = dict(quant="nf4", checkpointing="offload")
    assert _seconds(spec_8b, micro=4, **kw) < _seconds(spec_8b, micro=2, **kw)
    assert _seconds(spec_8b, micro=4, **kw) > _seconds(spec_8b, micro=4, checkpointing="offload")


def test_the_fused_recompute_skips_the_down_projection(spec_8b):
    """kernels/lora_mlp.py throws a recompute's output away, so the fused path never re-runs down's GEMM."""
    from ppalli.plan.speed import recompute_flops_per_token

    fused = recompute_flops_per_token(spec_8b, 2048, "full")
    reference = recompute_flops_per_token(spec_8b, 2048, "full", fast_path=False)
    assert reference - fused == 2 * spec_8b.layers * spec_8b.hidden * spec_8b.intermediate
    assert recompute_flops_per_token(spec_8b, 2048, "none") == 0


def test_fused_efficiency_follows_the_width_between_the_measured_ones():
    from ppalli.plan.speed import FAST_EFFICIENCY, fast_efficiency

    narrow, wide = min(FAST_EFFICIENCY), max(FAST_EFFICIENCY)
    assert fast_efficiency(narrow) == FAST_EFFICIENCY[narrow] and fast_efficiency(wide) == FAST_EFFICIENCY[wide]
    assert FAST_EFFICIENCY[narrow] < fast_efficiency(3072) < FAST_EFFICIENCY[wide]
    assert fast_efficiency(896) == FAST_EFFICIENCY[narrow] and fast_efficiency(8192) == FAST_EFFICIENCY[wide]


