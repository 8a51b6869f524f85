"""The loss on the fast path: the swapped decoder run as one stack, the lm_head fused with the cross entropy.

`fast_causal_lm_loss` runs the swapped decoder itself (embeddings, RoPE tables, layers, final norm) and
fuses the lm_head with the cross entropy, so neither HF's (T, T) packed-sequence mask nor the (N, V)
logits are ever built. The reference path computes the same sum from `model(...).logits` with
F.cross_entropy(reduction="sum"); tests hold the two to each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ppalli.data.collate import right_padded
from ppalli.errors import PpalliError
from ppalli.kernels.linear_cross_entropy import linear_cross_entropy
from ppalli.kernels.rms_norm import rms_norm
from ppalli.models.families import family_for_layer
from ppalli.models.fast import (
    backbone_of,
    causal_lm,
    cu_seqlens_from_position_ids,
    fully_swapped,
    head_problem,
    norm_eps,
)


def _padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """None when every row is right-padded (or not padded), else the (B, T) mask for the attention.

    With right padding, causal attention lets no real token see a padding token (all keys j <= i of a real
    query i are real), so the mask changes nothing the loss reads and the unmasked kernels run. One sync (the
    training collate drops the masks of right-padded batches on the host, so its batches never get here).
    """
    if attention_mask is None:
        return None
    return None if right_padded(attention_mask) else attention_mask.bool()


def decoder_hidden_states(model, input_ids, position_ids=None, cu_seqlens=None, max_seqlen=None,
                          attention_mask=None) -> torch.Tensor:
    """The final-normed hidden states (B, T, d) of the swapped decoder: embeddings, RoPE tables, layers, norm."""
    backbone = backbone_of(model)
    if not fully_swapped(model):
        raise PpalliError("fast_causal_lm_loss needs apply_fast_path(model) first (the HF layers would mix "
                          "packed samples)")
    spec = family_for_layer(backbone.layers[0])
    b, t = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device)[None]  # (1, T), as HF builds it
    elif cu_seqlens is None:
        cu_seqlens = cu_seqlens_from_position_ids(position_ids)
    packing = {}
    if cu_seqlens is not None:
        if max_seqlen is None:  # once here rather than a device sync in every layer
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        packing = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_seqlen,
                       max_length_k=max_seqlen)
    mask = None if cu_seqlens is not None else _padding_mask(attention_mask)
    hidden = backbone.embed_tokens(input_ids)  # (B, T, d); Gemma's sqrt(d) scale is inside the module
    rope = spec.rope_tables(backbone, hidden, position_ids)
    for i, layer in enumerate(backbone.layers):
        hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=rope(i),
                       ppalli_mask_exact=True, **packing)
    norm = backbone.norm
    return rms_norm(hidden, norm.weight, norm_eps(norm), spec.norm_offset)


def fast_causal_lm_loss(model, input_ids, labels, position_ids=None, cu_seqlens=None, max_seqlen=None,
                        attention_mask=None, loss_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token losses fp32 (), count of trained tokens ()) of a causal LM batch on the fast path.

    input_ids, labels (B, T); labels follow HF (position t predicts labels[t+1]; -100 = no loss); packed rows
    pass position_ids (1, T) and cu_seqlens (n+1,) (and max_seqlen) from the collator. The lm_head and the
    cross entropy are fused (chunked; no (N, V) logits); Gemma-2/3's final logit softcap is applied.
    loss_rows (n,): the flat indices of the positions whose target trains (objectives.loss_rows, made on the
    host by the collator): the lm_head then runs on those n rows only, the others' loss and gradient being 0.
    """
    if (why := head_problem(model)) is not None:
        raise PpalliError(f"fast_causal_lm_loss: {why}")
    lm = causal_lm(model)
    hidden = decoder_hidden_states(model, input_ids, position_ids, cu_seqlens, max_seqlen, attention_mask)
    weight = lm.get_output_embeddings().weight  # (V, d)
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): row t's target is labels[t+1]
    h, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (B*T, d), (B*T,)
    if loss_rows is not None:  # only rows with a loss: (n, d), (n,); the backward scatters into zeros
        h, targets = h.index_select(0, loss_rows), targets.index_select(0, loss_rows)
    h = h if h.dtype == weight.dtype else h.to(weight.dtype)  # a kbit-prepared fp32 head computes in fp32
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy(h, weight, targets, ignore_index=-100, softcap=softcap, reduction="sum")
    return loss, (labels[:, 1:] != -100).sum()
