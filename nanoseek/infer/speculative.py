"""MTP self-speculative decoding (V3 report §5.4.3): the MTP depth drafts, the main model verifies.

After the main model has run position i (final hidden h_i) and token t_{i+1} is known, the first MTP
depth turns [Emb(t_{i+1}) ; h_i] into a distribution q over t_{i+2} exactly as in training; we draw
a draft d ~ q. One main-model forward over [t_{i+1}, d] then gives the target distributions p at
both positions. Drafts further ahead (num_speculative_tokens > 1) reuse the depth on its own
output hidden state, as vLLM does for DeepSeek's single MTP layer.

Acceptance is speculative sampling (Leviathan et al. 2023, Chen et al. 2023): accept d with
probability min(1, p(d) / q(d)); at the first rejection draw from normalize(max(0, p - q)); when
every draft is accepted draw a bonus token from the next p. The emitted tokens are then distributed
exactly as if drawn from p one at a time. Greedy rows have one-hot p and q, which turns the rule into
"accept iff the draft is the target's argmax", so greedy output equals plain greedy decoding.

The MTP depth keeps its own KV cache (layer index num_hidden_layers + depth) for every position
whose next token is final; positions written for drafts are overwritten once verified.
"""

from __future__ import annotations

import torch

from nanoseek.infer.sampling import RandomStream, draw
from nanoseek.model.attention import KVCache
from nanoseek.model.transformer import CausalLM


def mtp_forward(
    model: CausalLM, cache: KVCache, next_token_ids: torch.Tensor, previous_hidden: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Run the first MTP depth: position i sees Emb(t_{i+1}) and h_i. Returns its normed hidden [b, s, hidden].

    next_token_ids [b, s], previous_hidden [b, s, hidden] (the main model's final hidden at the same
    positions, or the depth's own output when drafting further ahead), positions [b, s].
    """
    angles = model.model.rotary_emb(positions)
    mask = model.attention_mask(positions, cache, None)
    embeddings = model.model.embed_tokens(next_token_ids)
    hidden, _ = model.mtp[0](embeddings, previous_hidden, angles, cache=cache, positions=positions, mask=mask)
    return hidden


def accept_drafts(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    drafts: list[int],
    stream: RandomStream,
) -> tuple[list[int], int]:
    """Speculative sampling for one sequence: (the emitted tokens, how many drafts were accepted).

    target_probs [k + 1, vocab]: p at each verified position (the last one gives the bonus token);
    draft_probs [k, vocab]: q each draft was drawn from; drafts: the k drafted ids. Uses one uniform
    number per tested draft and one for the final draw, all from the sequence's own stream.
    """
    emitted = []
    for j, token in enumerate(drafts):
        p, q = float(target_probs[j, token]), float(draft_probs[j, token])
        u = stream.next()
        if u * q < p:  # accept with probability min(1, p / q)
            emitted.append(token)
            continue
        residual = (target_probs[j] - draft_probs[j]).clamp_(min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the residual is p itself
            residual = target_probs[j]
        emitted.append(_draw_one(residual, stream))
        return emitted, j
    emitted.append(_draw_one(target_probs[len(drafts)], stream))
    return emitted, len(drafts)


def _draw_one(probs: torch.Tensor, stream: RandomStream) -> int:
    u = torch.tensor([stream.next()], dtype=torch.float64)
    return int(draw(probs[None], u)[0])
