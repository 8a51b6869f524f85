"""lora_glu: the gated activation with the adapters' rank-r terms folded in, against autograd through the
plain formula g = g0 + sg xag Bg^T, u = u0 + su xau Bu^T, h = act(g) * u, dh = dh0 + dxad Ad.
Odd shapes (N not a multiple of the 64-row tile, I not of the 128-column tile), ranks below and at the
16 that tl.dot needs, each adapter term absent in turn, and the in-place backward."""

import pytest
import torch
from reference import assert_close, assert_close_norm, geglu_ref, swiglu_ref

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels.lora_glu import Tiles, lora_glu, lora_glu_bwd, lora_glu_fwd, lora_glu_fwd_had  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
REFS = {"silu": swiglu_ref, "gelu_tanh": geglu_ref}


def _inputs(n, i, r, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE)

    return dict(g0=rnd(n, i, scale=3), u0=rnd(n, i), xag=rnd(n, r), bg=rnd(i, r, scale=0.3), xau=rnd(n, r),
                bu=rnd(i, r, scale=0.3), dh0=rnd(n, i), dxad=rnd(n, r), ad=rnd(r, i, scale=0.3))


def _reference(t, sg, su, act, use):
    """(h, dg0, du0, dBg, dBu, dAd) by autograd through the plain formula."""
    leaves = {n: t[n].clone().requires_grad_() for n in ("g0", "u0", "bg", "bu", "ad")}
    g = leaves["g0"] + sg * t["xag"] @ leaves["bg"].t() if use["g"] else leaves["g0"]
    u = leaves["u0"] + su * t["xau"] @ leaves["bu"].t() if use["u"] else leaves["u0"]
    h = REFS[act](g, u)
    dh = t["dh0"] + t["dxad"] @ t["ad"] if use["d"] else t["dh0"]
    h.backward(dh)
    d_ad = t["dxad"].t() @ h.detach()  # down's dA = (sd dy Bd)^T h, with dxad standing for sd dy Bd
    return h.detach(), leaves["g0"].grad, leaves["u0"].grad, leaves["bg"].grad, leaves["bu"].grad, d_ad


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("n,i,r", [(64, 128, 16), (70, 200, 8), (5, 37, 16), (300, 130, 16)])
@pytest.mark.parametrize("use", [dict(g=True, u=True, d=True), dict(g=False, u=True, d=False),
                                 dict(g=True, u=False, d=True)], ids=["all", "up-only", "no-up"])
def test_forward_and_backward_match_autograd(act, n, i, r, use):
    t, sg, su = _inputs(n, i, r), 0.5, 2.0
    h_ref, dg_ref, du_ref, dbg_ref, dbu_ref, dad_ref = _reference(t, sg, su, act, use)
    xag, bg = (t["xag"], t["bg"]) if use["g"] else (None, None)
    xau, bu = (t["xau"], t["bu"]) if use["u"] else (None, None)
    dxad, ad = (t["dxad"], t["ad"]) if use["d"] else (None, None)
    h = lora_glu_fwd(t["g0"], t["u0"], xag, bg, sg, xau, bu, su, act)
    assert_close("h", h, h_ref, DTYPE)
    if use["d"]:  # down's h Ad^T from the forward's tiles; 8 programs per "SM": runs of 1-3 column tiles
        for store in (True, False):
            h2, had = lora_glu_fwd_had(t["g0"], t["u0"], xag, bg, sg, xau, bu, su, t["ad"], act, store_h=store,
                                       tiles=Tiles(16, 32, 4, 8))
            assert (h2 is None) != store
            if store:
                assert_close("h", h2, h_ref, DTYPE)
            assert_close("had", had, h_ref @ t["ad"].t(), DTYPE)
    g0, u0 = t["g0"].clone(), t["u0"].clone()
    sums = (use["g"], use["u"], use["d"])
    # small tiles and 2 runs per "SM" (4 under the interpreter): several runs, each over several row tiles
    dg, du, dbg, dbu, dad = lora_glu_bwd(t["dh0"], g0, u0, xag, bg, sg, xau, bu, su, dxad, ad, act, sums,
                                         tiles=Tiles(16, 32, 4, 2))
    assert dg.data_ptr() == g0.data_ptr() and du.data_ptr() == u0.data_ptr()  # written over g0 and u0
    # dgate: atol 5e-5, not 1e-5: GeGLU's derivative uses _utils.tanh (exp-based, absolute error near fp32
    # eps), multiplied by dh ~ N(0, 1 + r * 0.09) that carries down's rank-r term (measured 1.7e-5 at worst)
    torch.testing.assert_close(dg, dg_ref, atol=5e-5, rtol=1e-5)
    assert_close("dup", du, du_ref, DTYPE)
    for name, got, ref, used in (("dBg", dbg, dbg_ref, use["g"]), ("dBu", dbu, dbu_ref, use["u"]),
                                 ("dAd", dad, dad_ref, use["d"])):
        if used:  # sums over n rows of the above: their tolerance grows with sqrt(n)
            torch.testing.assert_close(got, ref, atol=5e-5 * n**0.5, rtol=1e-5, msg=name)
        else:
            assert got is None, name


def test_fwd_had_with_fixed_column_runs():
    """Tiles.runs fixes fwd_had's column runs (the H200's setting: 3), uneven ones included: 200 columns in
    32-column tiles are 7 tiles, 3 runs of 3, 3 and 1."""
    t = _inputs(70, 200, 16)
    args = (t["g0"], t["u0"], t["xag"], t["bg"], 0.5, t["xau"], t["bu"], 2.0, t["ad"])
    h_ref = lora_glu_fwd(*args[:8])
    for runs in (1, 3, 7):
        h, had = lora_glu_fwd_had(*args, tiles=Tiles(16, 32, 4, runs=runs))
        assert_close("h", h, h_ref, DTYPE)
        # a sum over 200 columns in per-run fp32 parts against cuBLAS's order: elementwise it sat 2.7e-5 off
        # on the H200 (values ~10), so the norm is compared
        assert_close_norm("had", had, h_ref @ t["ad"].t(), DTYPE)


def test_fwd_had_settings_swept_per_gpu_give_the_same_results():
    """Each GPU's own launch setting (the H100's 128-column tiles on 2 warps) against the plain forward."""
    from ppalli.kernels.lora_glu import FWD_HAD_TILES_BY_GPU

    t = _inputs(70, 300, 16)
    args = (t["g0"], t["u0"], t["xag"], t["bg"], 0.5, t["xau"], t["bu"], 2.0, t["ad"])
    h_ref = lora_glu_fwd(*args[:8])
    for tiles in FWD_HAD_TILES_BY_GPU.values():
        h, had = lora_glu_fwd_had(*args, tiles=tiles)
        assert_close("h", h, h_ref, DTYPE)
        assert_close_norm("had", had, h_ref @ t["ad"].t(), DTYPE)


def test_default_tiles_give_the_same_gradients():
    """The launch setting the fast path uses (BWD_TILES: runs over the rows) against small tiles."""
    t = _inputs(300, 260, 16)
    args = (t["xag"], t["bg"], 0.5, t["xau"], t["bu"], 2.0, t["dxad"], t["ad"], "silu", (True, True, True))
    ours = lora_glu_bwd(t["dh0"], t["g0"].clone(), t["u0"].clone(), *args)
    small = lora_glu_bwd(t["dh0"], t["g0"].clone(), t["u0"].clone(), *args, tiles=Tiles(16, 32, 4, 1))
    for a, b in zip(ours, small):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_column_views_of_a_stacked_product_are_read_in_place():
    """xag and xau as column slices of one (N, 2r) tensor, as lora_mlp's stacked x [Ag; Au]^T gives them."""
    t = _inputs(70, 200, 16)
    stacked = torch.cat([t["xag"], t["xau"]], dim=1)
    xag, xau = stacked[:, :16], stacked[:, 16:]
    assert xag.stride(0) == 32
    h = lora_glu_fwd(t["g0"], t["u0"], xag, t["bg"], 0.5, xau, t["bu"], 2.0)
    assert_close("h", h, lora_glu_fwd(t["g0"], t["u0"], t["xag"], t["bg"], 0.5, t["xau"], t["bu"], 2.0), DTYPE)


def test_backward_without_sums_returns_none():
    t = _inputs(8, 16, 4)
    *_, dbg, dbu, dad = lora_glu_bwd(t["dh0"], t["g0"], t["u0"], t["xag"], t["bg"], 1.0, None, None, 1.0)
    assert dbg is None and dbu is None and dad is None


def test_bad_inputs_are_refused():
    t = _inputs(8, 16, 4)
    with pytest.raises(PpalliError, match="act must be one of"):
        lora_glu_fwd(t["g0"], t["u0"], None, None, 1.0, None, None, 1.0, act="relu")
    with pytest.raises(PpalliError, match="same shape|one shape"):
        lora_glu_fwd(t["g0"], t["u0"][:, :8].contiguous(), None, None, 1.0, None, None, 1.0)
    with pytest.raises(PpalliError, match="share one rank"):
        lora_glu_fwd(t["g0"], t["u0"], t["xag"], t["bg"], 1.0, t["xag"][:, :2].contiguous(),
                     t["bu"][:, :2].contiguous(), 1.0)
    with pytest.raises(PpalliError, match="lora_A must be"):
        lora_glu_fwd_had(t["g0"], t["u0"], t["xag"], t["bg"], 1.0, None, None, 1.0, t["ad"][:, :8].contiguous())
    with pytest.raises(PpalliError, match="share one rank"):
        lora_glu_fwd_had(t["g0"], t["u0"], t["xag"], t["bg"], 1.0, None, None, 1.0, t["ad"][:2].contiguous())
    with pytest.raises(PpalliError, match="adapters that are absent"):
        lora_glu_bwd(t["dh0"], t["g0"], t["u0"], t["xag"], t["bg"], 1.0, None, None, 1.0, sums=(True, True, False))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_autograd_function_gives_every_gradient(act):
    """LoRAGLUFunction: gradients for g0, u0, both (N, r) products and both lora_B weights, inputs untouched."""
    t = _inputs(70, 200, 8)
    names = ("g0", "u0", "xag", "bg", "xau", "bu")
    ours = {n: t[n].clone().requires_grad_() for n in names}
    ref = {n: t[n].clone().requires_grad_() for n in names}
    h = lora_glu(ours["g0"], ours["u0"], ours["xag"], ours["bg"], 0.5, ours["xau"], ours["bu"], 2.0, act)
    g = ref["g0"] + 0.5 * ref["xag"] @ ref["bg"].t()
    u = ref["u0"] + 2.0 * ref["xau"] @ ref["bu"].t()
    h_ref = REFS[act](g, u)
    assert_close("h", h, h_ref, DTYPE)
    h.backward(t["dh0"])
    h_ref.backward(t["dh0"])
    for n in names:
        torch.testing.assert_close(ours[n].grad, ref[n].grad, atol=5e-5, rtol=1e-5)  # as dgate above
    assert torch.equal(ours["g0"].detach(), t["g0"]) and torch.equal(ours["u0"].detach(), t["u0"])


def test_bf16_matches_fp32_within_rounding():
    """bf16 operands against the fp32 result: the rank-r products run through tl.dot in bf16 (on the CPU
    interpreter, whose bf16 tl.dot is wrong, through fp32 copies: _utils.dot_upcast)."""
    t = _inputs(40, 200, 16)
    args = ("silu", (True, True, True))

    def run(dtype):
        c = {k: v.to(dtype) for k, v in t.items()}
        h, had = lora_glu_fwd_had(c["g0"], c["u0"], c["xag"], c["bg"], 0.5, c["xau"], c["bu"], 2.0, c["ad"])
        return (h, had, *lora_glu_bwd(c["dh0"], c["g0"].clone(), c["u0"].clone(), c["xag"], c["bg"], 0.5, c["xau"],
                                 c["bu"], 2.0, c["dxad"], c["ad"], *args))

    for name, ref, got in zip(("h", "had", "dg", "du", "dBg", "dBu", "dAd"), run(torch.float32),
                              run(torch.bfloat16)):
        # bf16 inputs are rounded once (2**-8 relative) before every product: 2e-2 of the largest value
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, f"{name}: {err:.2e}"


def test_fwd_had_takes_the_setting_swept_for_this_gpu(monkeypatch):
    # The launch setting is looked up by the device's name: the H200's and the H100's own sweeps, else the default.
    from ppalli.kernels import lora_glu as mod

    seen = []
    monkeypatch.setattr(mod, "_fwd", lambda *args: seen.append(args[-1]) or (None, None))
    t = _inputs(8, 64, 16)
    call = (t["g0"], t["u0"], t["xag"], t["bg"], 1.0, t["xau"], t["bu"], 1.0, t["ad"])
    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", ""):
        monkeypatch.setattr(mod, "device_name", lambda device, name=name: name)
        lora_glu_fwd_had(*call)
    lora_glu_fwd_had(*call, tiles=Tiles(16, 64, 4))  # a setting asked for wins
    assert seen == [Tiles(32, 64, 2, 16, 3, 3), Tiles(32, 128, 2, 16), mod.FWD_HAD_TILES, Tiles(16, 64, 4)]


def test_bwd_takes_the_setting_swept_for_this_gpu(monkeypatch):
    # The H200 fixes the backward's row runs at 5 whatever the shape, the H100 takes 32-row tiles; others the default.
    from ppalli.kernels import lora_glu as mod

    t = _inputs(300, 260, 16)
    args = (t["xag"], t["bg"], 0.5, t["xau"], t["bu"], 2.0, t["dxad"], t["ad"], "silu", (True, True, True))
    outs = {}
    for name in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", ""):
        monkeypatch.setattr(mod, "device_name", lambda device, name=name: name)
        outs[name] = mod.lora_glu_bwd(t["dh0"], t["g0"].clone(), t["u0"].clone(), *args)
    for gpu in ("NVIDIA H200", "NVIDIA H100 80GB HBM3"):
        for a, b in zip(outs[gpu], outs[""]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert mod.BWD_TILES_BY_GPU["NVIDIA H100 80GB HBM3"] == Tiles(32, 64, 4, 8)
    h200 = mod.BWD_TILES_BY_GPU["NVIDIA H200"]
    cpu = torch.device("cpu")
    assert mod._runs(16384, 16, 128, h200, cpu)[1] == 5 == mod._runs(8192, 16, 224, h200, cpu)[1]
    assert mod._runs(40, 16, 128, h200, cpu)[1] == 3  # never more runs than row tiles (16-row tiles: 3)
    assert mod._runs(16384, 16, 128, mod.BWD_TILES, cpu)[1] == 1  # 8 per SM x the interpreter's 4 "SMs" / 128
    fwd = mod.FWD_HAD_TILES_BY_GPU["NVIDIA H200"]  # fwd_had's column runs: 3 at T4's and T1's MLP shapes
    assert mod._runs(8192, 64, 512, fwd, cpu) == (2752, 3) and mod._runs(14336, 64, 256, fwd, cpu) == (4800, 3)


def test_fwd_had_settings_give_no_warp_the_same_rows():
    # The summed h Ad^T lays the tile out for its (bm, r) output: more than bm / 16 warps compute rows twice.
    from ppalli.kernels import lora_glu as mod

    for tiles in (mod.FWD_HAD_TILES, *mod.FWD_HAD_TILES_BY_GPU.values()):
        assert tiles.warps * 16 <= tiles.bm, tiles
