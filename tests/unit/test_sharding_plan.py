"""plan.sharding: whole model per rank when it fits, FSDP2-sharded 16-bit weights when it does not."""

import pytest
from test_planner import cfg, one_line

from ppalli.errors import PpalliError
from ppalli.plan.memory import GIB, ModelSpec, root_params, sharded_weight_bytes, weight_bytes
from ppalli.plan.planner import make_plan
from ppalli.plan.whatif import whatif_env

# meta-llama/Llama-3.1-70B config.json, the fields that size it
LLAMA_31_70B = {"model_type": "llama", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
                "tie_word_embeddings": False}


def plan_for(spec, gpu, world_size, **sections):
    return make_plan(whatif_env(gpu), cfg(**sections), spec, world_size=world_size)


def test_a_shard_is_the_layers_share_plus_two_layers_plus_the_root(spec_8b):
    whole = weight_bytes(spec_8b, "none", False, 2)
    root = root_params(spec_8b)
    assert root == 2 * 128256 * 4096 + 4096
    layer = (spec_8b.n_params - root) // 32
    assert sharded_weight_bytes(spec_8b, 2, 8) == 2 * ((spec_8b.n_params - root) // 8 + 2 * layer + root)
    assert sharded_weight_bytes(spec_8b, 2, 2) < 0.62 * whole  # 8B over 2: 9.2 of 15.0 GiB (the root is 2 GiB)


def test_8b_that_fits_each_card_stays_whole(spec_8b):
    plan = plan_for(spec_8b, "h100", 2, train={"batch_size": 2})
    assert plan.sharding == "off" and plan.quantization == "none" and plan.fast_path
    assert "fits each GPU" in plan.reasons["sharding"]


def test_70b_on_two_h200_shards_16_bit_weights_instead_of_4_bit():
    spec = ModelSpec.from_config(LLAMA_31_70B)
    alone = plan_for(spec, "h200", 1, train={"batch_size": 1})
    assert alone.quantization == "nf4"  # 131 GiB of 16-bit weights do not fit one 141 GB card
    plan = plan_for(spec, "h200", 2, train={"batch_size": 1})
    assert plan.sharding == "fsdp" and plan.quantization == "none"
    assert not plan.fast_path and "FSDP2" in plan.reasons["fast_path"]
    assert plan.predicted_peak_gib <= plan.budget_gib
    assert "FSDP2 over 2 ranks" in plan.reasons["sharding"] and "sharding: " in "\n".join(plan.explain())


def test_pinned_fsdp_with_4_bit_weights_is_an_error(spec_8b):
    with pytest.raises(PpalliError) as err:
        plan_for(spec_8b, "h100", 2, train={"batch_size": 2}, plan={"sharding": "fsdp", "quantization": "nf4"})
    assert "plan.quantization=nf4" in one_line(err) and "plan.sharding=off" in str(err.value)


def test_pinned_fsdp_shards_and_takes_the_reference_path(spec_8b):
    plan = plan_for(spec_8b, "h100", 2, train={"batch_size": 2}, plan={"sharding": "fsdp"})
    assert plan.sharding == "fsdp" and not plan.fast_path
    assert plan.predicted_peak_gib < plan_for(spec_8b, "h100", 2, train={"batch_size": 2},
                                              plan={"sharding": "off", "fast_path": "off"}).predicted_peak_gib


def test_fsdp_on_one_process_says_there_is_nothing_to_shard(spec_8b):
    plan = plan_for(spec_8b, "h100", 1, plan={"sharding": "fsdp"})
    assert plan.sharding == "off" and "one process" in plan.reasons["sharding"]
    assert "sharding" not in plan_for(spec_8b, "h100", 1).reasons  # nothing to say for one process


def test_auto_keeps_4_bit_when_a_pin_rules_sharding_out():
    spec = ModelSpec.from_config(LLAMA_31_70B)
    plan = plan_for(spec, "h200", 2, train={"batch_size": 1}, plan={"fast_path": "on"})
    assert plan.sharding == "off" and plan.quantization == "nf4" and "fast_path=on" in plan.reasons["sharding"]


def test_whole_and_sharded_weights_in_gib(spec_8b):
    assert weight_bytes(spec_8b, "none", False, 2) / GIB == pytest.approx(14.96, abs=0.01)



def test_sharded_plans_may_offload_layer_inputs():
    spec = ModelSpec.from_config(LLAMA_31_70B)
    # 8 x 32768 tokens: the 16-bit shards fit only with the layer inputs in CPU memory
    plan = plan_for(spec, "h200", 2, train={"batch_size": 8}, data={"max_seq_len": 32768})
    assert (plan.sharding, plan.checkpointing, plan.quantization) == ("fsdp", "offload", "none")
