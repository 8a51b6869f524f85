"""lora_b_bwd: dxa = s dy B and dB = s dy^T xa from one pass over dy, against the two matmuls; row counts not a
multiple of the program's rows, widths not a multiple of its column step (5 x 123), ranks below the 16 of a
dot, dy and xa as column blocks of wider buffers (lora_qkv's layout), and lora_bwd taking this path (the two
GEMMs under torch.use_deterministic_algorithms)."""

import pytest
import torch
from reference import assert_close, assert_close_norm

pytest.importorskip("triton")
from ppalli.errors import PpalliError  # noqa: E402
from ppalli.kernels import lora_linear  # noqa: E402
from ppalli.kernels.lora_b_bwd import launch_blocks, lora_b_bwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(n, m, r, dtype, seed=0, dy_cols=None, xa_cols=None):
    """dy (n, m) and xa (n, r), as the leading column blocks of (n, dy_cols) and (n, xa_cols) when given."""
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(n, dy_cols or m, generator=g).to(DEVICE, dtype)[:, :m]  # sliced on the device: a view
    xa = torch.randn(n, xa_cols or r, generator=g).to(DEVICE, dtype)[:, :r]
    b = (torch.randn(m, r, generator=g) * 0.3).to(DEVICE, dtype)
    return dy, xa, b


def _reference(dy, xa, b, s):
    """fp32 products, as cuBLAS accumulates them."""
    return s * dy.float() @ b.float(), s * dy.float().t() @ xa.float()


@pytest.mark.parametrize("n,m,r", [(64, 256, 16), (37, 300, 8), (5, 123, 16), (130, 64, 4)])
def test_matches_the_two_matmuls_fp32(n, m, r):
    dy, xa, b = _inputs(n, m, r, torch.float32)
    dxa, db = lora_b_bwd(dy, xa, b, 0.5)
    dxa_ref, db_ref = _reference(dy, xa, b, 0.5)
    assert dxa.dtype == db.dtype == torch.float32 and db.is_contiguous()
    assert_close("dxa", dxa, dxa_ref, torch.float32)
    assert_close("dB", db, db_ref, torch.float32)


@pytest.mark.parametrize("blocks", [(64, 256, 8), (32, 64, 4)])
def test_every_launch_setting_the_rule_picks_matches(blocks):
    """The rule's settings on a GPU of 132 SMs: 64 x 256 for T1's 8192 x 4096, 128 x 128 for T4's 16384 x 2048,
    64 x 128 for a 1024-wide k; each setting (here on few rows and a width of 1.2 column steps) gives the sums."""
    assert launch_blocks(8192, 4096, 132) == (64, 256, 8)
    assert launch_blocks(16384, 2048, 132) == (128, 128, 8)
    assert launch_blocks(8192, 1024, 132) == (64, 128, 4)
    n, m, r = 70, blocks[1] + blocks[1] // 5, 16
    dy, xa, b = _inputs(n, m, r, torch.float32)
    dxa, db = lora_b_bwd(dy, xa, b, 0.5, blocks=blocks)
    dxa_ref, db_ref = _reference(dy, xa, b, 0.5)
    assert_close("dxa", dxa, dxa_ref, torch.float32)
    assert_close("dB", db, db_ref, torch.float32)


@pytest.mark.parametrize("n,m,r", [(64, 256, 16), (37, 300, 8)])
def test_bf16_inputs_give_bf16_dxa_and_an_fp32_db(n, m, r):
    """The layout of a bf16 model with fp32 PEFT adapters: dB comes back in the adapter's fp32, never rounded
    to bf16 on the way. Compared by norm: dB sums n products of bf16 inputs."""
    dy, xa, b = _inputs(n, m, r, torch.bfloat16)
    dxa, db = lora_b_bwd(dy, xa, b, 2.0, torch.float32)
    dxa_ref, db_ref = _reference(dy, xa, b, 2.0)
    assert dxa.dtype == torch.bfloat16 and db.dtype == torch.float32
    assert_close("dxa", dxa, dxa_ref.to(torch.bfloat16), torch.bfloat16)
    assert_close_norm("dB", db, db_ref, torch.float32)


def test_column_blocks_of_wider_buffers_are_read_in_place():
    """lora_qkv hands dq, dk, dv as column blocks of one (N, Hq*D + 2 Hk*D) buffer and x A^T as column blocks of
    one (N, 3r) product."""
    dy, xa, b = _inputs(45, 96, 8, torch.float32, dy_cols=160, xa_cols=24)
    assert not dy.is_contiguous() and not xa.is_contiguous()
    dxa, db = lora_b_bwd(dy, xa, b, 0.25)
    dxa_ref, db_ref = _reference(dy, xa, b, 0.25)
    assert_close("dxa", dxa, dxa_ref, torch.float32)
    assert_close("dB", db, db_ref, torch.float32)


def test_lora_bwd_takes_the_one_pass_and_matches_the_two_gemms(monkeypatch):
    dy, xa, b = _inputs(37, 300, 8, torch.float32)
    x = torch.randn(37, 40).to(DEVICE)
    calls = []
    real = lora_linear.lora_b_bwd
    monkeypatch.setattr(lora_linear, "lora_b_bwd", lambda *args: calls.append(1) or real(*args))
    dxa, da, db = lora_linear.lora_bwd(dy, x, xa, None, b, 0.5, True, True)
    assert calls == [1]
    dxa_ref, db_ref = _reference(dy, xa, b, 0.5)
    assert_close("dxa", dxa, dxa_ref, torch.float32)
    assert_close("dB", db, db_ref, torch.float32)
    assert_close("dA", da, dxa_ref.t() @ x, torch.float32)
    lora_linear.lora_bwd(dy, x, xa, None, b, 0.5, True, False)  # no dB asked for: dy B alone, one GEMM
    assert calls == [1]
    torch.use_deterministic_algorithms(True)  # the atomic adds sum in no fixed order: the two GEMMs instead
    try:
        _, _, db_fixed = lora_linear.lora_bwd(dy, x, xa, None, b, 0.5, False, True)
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == [1]
    assert_close("dB, deterministic", db_fixed, db_ref, torch.float32)


def test_bad_inputs_are_refused():
    dy, xa, b = _inputs(8, 32, 4, torch.float32)
    with pytest.raises(PpalliError, match="lora_b_bwd needs dy"):
        lora_b_bwd(dy, xa, b[:16], 1.0)
    with pytest.raises(PpalliError, match="one dtype"):
        lora_b_bwd(dy, xa.double(), b, 1.0)
