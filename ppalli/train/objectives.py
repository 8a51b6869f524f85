"""Training objectives. Each returns a loss SUM and the count it is normalized by.

The loop divides every micro-batch's sum by the count of the whole accumulated batch, so the update is
the same whatever the micro-batch split (STYLE.md point 10: loss math lives in one tested place;
torchtune's per-micro-batch means drifted from it).

- SFT: sum of token cross-entropies over trained tokens; count = trained tokens.
- ORPO (Hong et al. 2024): SFT on the chosen response + lambda * -log sigmoid(log odds ratio);
  count = chosen trained tokens for the NLL part, pairs for the odds part (folded per pair, see below).
- DPO (Rafailov et al. 2023), against the base model (the adapter off) as the reference.
- SimPO (Meng et al. 2024): DPO's sigmoid loss on length-normalized log-likelihoods, less a target margin gamma,
  with no reference model (one forward a pair, as ORPO).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

IGNORE = -100


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss under the HF shift: labels[..., 1:] != -100."""
    return int((labels[..., 1:] != IGNORE).sum())


# The fast path's lm_head runs only on the rows that carry a loss (loss_rows) unless nearly all do: gathering
# the rows and scattering their gradient back costs two passes over (N, d) (64 MiB each at Llama-3.2-1B's
# 16384 x 2048, not yet timed), against the 0.83 + 0.82 ms of lm_head GEMMs per 1024 rows that T4's profile
# shows (H200, results/2026-12-04-h200-t4-s19-profile-ppalli-1.txt).
# On ko_chatbot_qa with responses-only labels 37% (Llama 3 tokenizer) / 28% (Qwen2.5) of tokens train.
LOSS_ROWS_BELOW = 0.95


def loss_rows(labels: torch.Tensor) -> torch.Tensor | None:
    """Flat indices into the (B * T) positions of a host batch whose next-token target trains (labels[:, t + 1]
    != -100), in order; None when at least LOSS_ROWS_BELOW of the positions do (nothing worth skipping)."""
    trains = F.pad(labels[:, 1:], (0, 1), value=IGNORE).reshape(-1) != IGNORE  # (B * T,)
    if trains.numel() == 0 or int(trains.sum()) >= LOSS_ROWS_BELOW * trains.numel():
        return None
    return trains.nonzero().squeeze(1)  # (n,)


def batch_trained_tokens(batch: dict) -> int:
    """trained_tokens of a batch: collate's host count when it has one (recipe._host_counts), since counting
    device labels syncs with the device."""
    if "trained_tokens" in batch:
        return int(batch["trained_tokens"])
    return trained_tokens(batch["labels"])


def model_inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if k in batch}


def reference_lm_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Plain HF forward, full logits, fp32 cross-entropy: the reference path every fast path must match."""
    logits = model(**model_inputs(batch)).logits  # (B, T, V)
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, batch_trained_tokens(batch)


def chunked_lm_loss(model, batch: dict, rows: int = 2048) -> tuple[torch.Tensor, int]:
    """reference_lm_loss without the (B, T, V) logits, for evaluation (no gradient flows through it): HF's
    own decoder, then the lm_head and an fp32 cross entropy `rows` trained tokens at a time (Gemma 2/3's
    final logit softcap applied as HF applies it, in the logits' dtype). Positions without a label never
    reach the head. Only for models whose causal-LM head is the lm_head (and softcap): see eval_lm_loss.
    Why: with Llama 3's 128,256-token vocabulary a 4 x 2048 micro-batch's fp32 logits alone take 4.2 GB
    (and log-softmax another copy); 2048 rows take 1.05 GB."""
    lm, h, y = _trained_hidden(model, batch, batch["labels"])
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start, logits in head_chunks(lm, h, rows):
        total += F.cross_entropy(logits.float(), y[start:start + rows], reduction="sum")
    return total, batch_trained_tokens(batch)


def head_chunks(lm, hidden: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, logits (<= rows, V)) of hidden (n, d) through the causal LM lm's head `rows` positions at a time,
    Gemma 2/3's final logit softcap applied as HF applies it (in the logits' dtype)."""
    head = lm.get_output_embeddings()
    cap = getattr(lm.config, "final_logit_softcapping", None)
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start:start + rows])  # (rows, V)
        yield start, torch.tanh(logits / cap) * cap if cap else logits


def eval_lm_loss(model) -> Callable:
    """The LM loss for evaluation: chunked_lm_loss for a fast-path family (_known_family), else
    reference_lm_loss."""
    return chunked_lm_loss if _known_family(model) else reference_lm_loss


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence (sum of trained-token log-probs, trained-token count), each (S,): S = the batch's rows, or
    the sequences of a packed row (preference_pack_collate: "cu_seqlens" (S+1,)).

    Where ppalli knows the model's head (_plain_head), only the trained tokens go through it, chunk by chunk
    (train/linear_logps.py: no (B, T, V) logits); else from the model's full logits."""
    tgt = batch["labels"][:, 1:]  # (B, T-1): position t predicts labels[t+1]
    mask = tgt != IGNORE
    seq = _target_sequences(batch, mask)  # (n,) the sequence of each trained target
    count = _sequences(batch)
    if not _plain_head(model):
        logits = model(**model_inputs(batch)).logits[:, :-1].float()
        logp = torch.gather(logits.log_softmax(-1), 2, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]  # (n,)
    else:
        from ppalli.train.linear_logps import linear_logps

        lm, h, y = _trained_hidden(model, batch, batch["labels"])
        weight = lm.get_output_embeddings().weight  # (V, d)
        logp = linear_logps(h.to(weight.dtype), weight, y, getattr(lm.config, "final_logit_softcapping", None))
    sums = torch.zeros(count, dtype=torch.float32, device=logp.device).index_add(0, seq, logp.float())
    counts = torch.zeros(count, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
    return sums, counts


def _sequences(batch: dict) -> int:
    cu = batch.get("cu_seqlens")
    return batch["labels"].shape[0] if cu is None else cu.numel() - 1


def _target_sequences(batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """(n,) the sequence each trained target (mask (B, T-1)) belongs to: its row, or in a packed row the sample
    that holds target position t + 1 (pack_collate masks each sample's first label, so no target crosses)."""
    cu = batch.get("cu_seqlens")
    if cu is None:
        return torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)  # (T-1,) the target's position in the row
    seq = torch.searchsorted(cu[1:].to(mask.device).long(), pos, right=True)  # (T-1,)
    return seq[None].expand_as(mask)[mask]


def _trained_hidden(model, batch: dict, labels):
    """(the HF causal LM, final hidden states of the trained positions (n, d), their targets (n,)): the decoder
    over `batch` without its head, for the chunked losses above. A packed row (cu_seqlens) on a fully fused
    model goes through ppalli's decoder, whose attention takes the boundaries (varlen); else HF's decoder (its
    masks find packed samples from position_ids)."""
    from ppalli.models.fast import backbone_of, causal_lm, fully_swapped
    from ppalli.models.fast_loss import decoder_hidden_states

    if batch.get("cu_seqlens") is not None and fully_swapped(model):
        hidden = decoder_hidden_states(model, batch["input_ids"], batch.get("position_ids"), batch["cu_seqlens"],
                                       batch.get("max_seqlen"))[:, :-1]  # (1, T-1, d)
    else:
        hidden = backbone_of(model)(**model_inputs(batch), use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, d)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE
    return causal_lm(model), hidden[mask], tgt[mask]


def _known_family(model) -> bool:
    """Whether the model is a fast-path family, whose causal-LM forward after the decoder is the lm_head (and,
    for Gemma 2/3, the final logit softcap): what chunked_lm_loss and sequence_logps rebuild."""
    from ppalli.models.families import family_for_layer
    from ppalli.models.fast import backbone_of

    try:
        layers = backbone_of(model).layers
    except AttributeError:
        return False
    return len(layers) > 0 and family_for_layer(layers[0]) is not None


def _plain_head(model) -> bool:
    """_known_family with an lm_head that is its weight alone (no LoRA on it, no bias)."""
    from ppalli.models.fast import head_problem

    return _known_family(model) and head_problem(model) is None


class SFT:
    name = "sft"

    def __init__(self, lm_loss: Callable = reference_lm_loss):
        self.lm_loss = lm_loss

    def normalizer(self, batch: dict) -> int:
        return batch_trained_tokens(batch)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        loss_sum, n = self.lm_loss(model, batch)
        return loss_sum, {"tokens": n}


def _pair_logps(model, batch):
    """Chosen and rejected answers in one forward: preference_collate stacks B chosen rows, then B rejected
    (preference_pack_collate the same order of sequences in one row)."""
    logp, n = sequence_logps(model, batch)
    b = batch["num_pairs"]
    return logp[:b], logp[b:], n[:b], n[b:]


class ORPO:
    """Per pair: NLL(chosen) / n_chosen + lam * -log sigmoid(log odds(chosen) - log odds(rejected)).

    The loop divides by the number of pairs of the accumulated batch, so each pair weighs the same.
    """

    name = "orpo"

    def __init__(self, lam: float = 0.1):
        self.lam = lam

    def normalizer(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        lp_c, lp_r, n_c, n_r = _pair_logps(model, batch)
        mean_c, mean_r = lp_c / n_c.clamp(min=1), lp_r / n_r.clamp(min=1)
        # log odds = log p - log(1 - p) with p the mean per-token probability (the paper's definition)
        log_odds = (mean_c - torch.log1p(-mean_c.exp().clamp(max=1 - 1e-6))) - (
            mean_r - torch.log1p(-mean_r.exp().clamp(max=1 - 1e-6)))
        ratio = -F.logsigmoid(log_odds)
        loss = (-mean_c + self.lam * ratio).sum()
        return loss, _pair_stats(self.lam * (mean_c - mean_r))  # TRL's ORPO rewards: lam x mean log p


class DPO:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))); the reference is the base (adapter off)."""

    name = "dpo"

    def __init__(self, beta: float = 0.1):
        self.beta = beta

    def normalizer(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        lp_c, lp_r, _, _ = _pair_logps(model, batch)
        with torch.no_grad(), model.disable_adapter():
            ref_c, ref_r, _, _ = _pair_logps(model, batch)
        margin = (lp_c - ref_c) - (lp_r - ref_r)
        loss = -F.logsigmoid(self.beta * margin).sum()
        return loss, _pair_stats(self.beta * margin)  # implicit rewards beta (log pi - log ref), as TRL logs them


class SimPO:
    """-log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma), a mean over each answer's trained
    tokens: the reward is the policy's own length-normalized log-likelihood, so no reference pass."""

    name = "simpo"

    def __init__(self, beta: float = 2.0, gamma: float = 1.0):
        self.beta, self.gamma = beta, gamma

    def normalizer(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        lp_c, lp_r, n_c, n_r = _pair_logps(model, batch)
        margin = self.beta * (lp_c / n_c.clamp(min=1) - lp_r / n_r.clamp(min=1))  # (B,) reward margins
        loss = -F.logsigmoid(margin - self.gamma).sum()
        return loss, _pair_stats(margin)  # TRL's CPO/SimPO rewards: beta x mean log p


PAIR_STATS = ("pairs", "margin_sum", "wins")  # what _pair_stats counts, summed over micro-batches and ranks


def _pair_stats(margin: torch.Tensor) -> dict:
    """Sums over a micro-batch's pairs of their reward margins (chosen's reward less rejected's, (B,)), which
    pair_metrics turns into a step's means once every micro-batch and rank is added. The sums stay device
    tensors: reading them here would sync each pass."""
    margin = margin.detach().float()
    # float64 so that pair_metrics' means on the device equal Python's division of the read sums
    return {"pairs": margin.numel(), "margin_sum": margin.sum().double(), "wins": (margin > 0).sum().double()}


def pair_metrics(stats: dict) -> dict:
    """A step's (or an evaluation's) preference metrics from summed _pair_stats: the mean reward margin and the
    share of pairs whose chosen answer out-rewards the rejected one (TRL's rewards/margins, rewards/accuracies).
    {} for SFT."""
    pairs = stats.get("pairs", 0)
    if not pairs:
        return {}
    return {"reward_margin": stats["margin_sum"] / pairs, "reward_accuracy": stats["wins"] / pairs}


def make_objective(name: str, *, beta: float | None, gamma: float = 1.0, lm_loss: Callable = reference_lm_loss):
    """The objective train.objective names; beta None takes its default (ORPO, DPO 0.1; SimPO 2.0)."""
    if name == "sft":
        return SFT(lm_loss)
    if name == "orpo":
        return ORPO(0.1 if beta is None else beta)
    if name == "dpo":
        return DPO(0.1 if beta is None else beta)
    if name == "simpo":
        return SimPO(2.0 if beta is None else beta, gamma)
    raise ValueError(f"unknown objective {name!r}")
