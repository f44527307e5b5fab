"""DeepSeekMoE: a router over fine-grained routed experts plus always-on shared experts.

    h' = u + SharedExperts(u) + sum_{i in TopK} g_i * Expert_i(u)          (V3 report eq. 12)

Routing follows the released code exactly (reference §2.2 and facts 4-6):
  * scores s = sigmoid(u . e_i) (V3) or softmax over all experts (V2), computed in fp32;
  * selection uses s + e_score_correction_bias (V3's aux-loss-free bias), the gate weights use
    the unbiased s of the chosen experts;
  * group-limited routing keeps the `topk_group` best of `n_group` groups, a group scored by the
    sum of its top-2 biased scores (noaux_tc, V3) or its max score (group_limited_greedy, V2);
    dropped groups are masked with -inf;
  * weights renormalized over the top-k when norm_topk_prob, then scaled by routed_scaling_factor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model import cpu_ops
from nanoseek.model.kernels import ExpertScratch, combine_slots, compute_dtype, dispatch_slots, grouped_swiglu
from nanoseek.model.layers import SwiGLU, linear, silu_and_mul


@dataclass
class RouterStats:
    """What one MoE layer reports per forward: the experts chosen and the sequence-wise balance loss.

    `tokens_per_expert` [n_routed_experts] (float32, detached) feeds the aux-loss-free bias update
    and load monitoring; it is counted from `indices` [tokens, k] when first read, so decoding, which
    never reads it, does not pay for it. `balance_loss` is sum_i f_i P_i averaged over sequences (V3
    eq. 17-20) without the alpha weight; None unless computed (training).
    """

    indices: torch.Tensor
    num_experts: int
    balance_loss: torch.Tensor | None

    @functools.cached_property
    def tokens_per_expert(self) -> torch.Tensor:
        return torch.bincount(self.indices.flatten(), minlength=self.num_experts).float()


class Router(nn.Module):
    """The `gate` of a DeepSeekMoE layer. Returns gate weights and expert indices per token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.scoring_func = config.scoring_func
        self.topk_method = config.topk_method
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        # Aux-loss-free balancing bias: fp32, changed only by the sign-rule update outside autograd.
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [tokens, hidden] -> (weights [tokens, k] fp32, indices [tokens, k], scores [tokens, E] fp32)."""
        kernels = cpu_ops.for_inference(x)
        with torch.autocast(x.device.type, enabled=False):  # fp32 logits under autocast too (DeepSeek's and HF's)
            if kernels is not None:  # as the one-call decode layer computes them (few tokens: no GEMM call)
                logits = kernels.router_logits(x.float(), self.weight.float())
            else:
                logits = F.linear(x.float(), self.weight.float())
        if kernels is not None:  # the ~20 ops below as one
            return tuple(kernels.route(
                logits, self.e_score_correction_bias if self.topk_method == "noaux_tc" else None,
                self.scoring_func == "sigmoid", self.n_group, self.topk_group, self.topk_method == "noaux_tc",
                self.top_k, self.norm_topk_prob, self.routed_scaling_factor,
            ))
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores.detach()
        if self.topk_method == "noaux_tc":
            choice = choice + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_group < self.n_group:
            grouped = choice.unflatten(-1, (self.n_group, -1))
            if self.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            kept_groups = group_scores.topk(self.topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores


# Up to this many (token, expert) pairs, inference runs them one by one instead of grouping tokens by
# expert: a speculative verification of 2 tokens x 8 experts (V3) costs less than the grouping's ~15 ops.
FEW_PAIRS = 16

# Without the fused kernels: when most experts are busy, one matmul over all of them (the gate weights
# zero the unchosen ones) can cost less than one call per busy expert: it reads every expert once at
# the GEMM's full rate instead of paying a call's overhead per expert, but reads the idle ones too and
# computes every expert for every token. Per expert, one by one costs the call overhead c plus the read time r (bytes / bandwidth); all
# at once costs r (1 + tokens / DENSE_TOKENS) for all E experts. So all at once from
# E r / (c + r) (1 + tokens / DENSE_TOKENS) busy experts, and never beyond DENSE_MAX_TOKENS tokens: only
# small experts get there. Measured per MoE layer on the 2-core EPYC: `small` (32 experts of 512 -> 256,
# oneDNN-packed), 16 tokens, 30 busy: one by one 2.19 ms fp32 / 1.54 ms bf16 (~38 us a call pair beyond
# the read), all at once 1.54 / 0.82, growing as 0.95 (1 + tokens / 29) fp32, 0.55 (1 + tokens / 22)
# bf16; `nano` (8 experts of 128 -> 96, plain fp32): 1 token in the engine 95 -> 87 us (2 busy), and
# alone 2 tokens 124 -> 43 us, 64 tokens 376 -> 277 us, 128 tokens 473 -> 1,212 us (hence the token
# cap); its speculative decoding gains most (a 2-token verify has up to 4 busy experts). V2-Lite's
# experts (2048 -> 1408, 17 MB in bf16) never get there: at any batch the threshold exceeds the busy
# experts its tokens can make (6 of 64).
EXPERT_CALL_SECONDS, READ_BYTES_PER_SECOND, DENSE_TOKENS, DENSE_MAX_TOKENS = 38e-6, 48e9, 25, 32

# On a GPU the other paths read the choices on the host (a sync per MoE layer) and launch a few kernels
# per busy expert, while running every expert is two products. For a few tokens (decoding) and stacks
# small enough to read every step, all at once wins: `small` (32 experts, 48 MB a layer in fp32) on
# an H100 decodes at 104 tok/s (batch 1) and 1,433 (16 requests) this way, 73 and 587 the other.
# Large stacks (V3: 11 GB a layer) keep the grouped path.
GPU_DENSE_MAX_TOKENS, GPU_DENSE_MAX_STACK_BYTES = 64, 64 << 20


# Inference on CPU runs a routed-experts layer as one fused kernel (`cpu_ops`' routed_experts: each used
# expert streamed once by torch's threads, no call per expert) for fp32 stacks at any token count and for
# bf16 and int8 ones up to EXPERT_KERNEL_MAX_TOKENS, beyond which oneDNN's bf16 dot-product instructions win. Per
# `small` MoE layer (32 experts of 512 -> 256, 4 chosen, random choices), 2 threads, kernel vs one
# oneDNN-packed call per expert vs one plain call per expert: fp32 1 token 159 / 300 / 276 us, 16 tokens
# 1.33 / 2.13 / 1.90 ms, 64 tokens 1.9 / 2.7 / 3.7 ms, 512 tokens 10.7 / 9.1 / 16.9 ms; bf16 1 token
# 111 / 232 / 281 us, 16 tokens 0.88 / 1.72 / 2.04 ms, 128 tokens 2.3 / 2.5 / 2.9 ms, 512 tokens 7.2 /
# 4.6 / 4.9 ms. It comes before running all experts at once (below), which it beats at `small`'s 16
# tokens (fp32 1.33 vs 1.54 ms), so that path is the fallback where the kernels are unavailable. Packed
# fp32 and bf16 engines stream copies of the stacks in panels (`stream_panels`; stop 30, fp32, weights
# cold: 1 token 118 -> 92 us, 16 tokens 1,072 -> 708 us).
EXPERT_KERNEL_MAX_TOKENS = 128


def all_at_once_threshold(expert_bytes: int, num_experts: int, tokens: int) -> float:
    """Busy experts from which running all `num_experts` experts at once costs less (see above)."""
    if tokens > DENSE_MAX_TOKENS:
        return float("inf")
    read = expert_bytes / READ_BYTES_PER_SECOND
    return num_experts * read / (EXPERT_CALL_SECONDS + read) * (1 + tokens / DENSE_TOKENS)


class RoutedExperts(nn.Module):
    """`n_routed_experts` SwiGLU experts stored as stacked weights [E, out, in].

    Tokens are grouped by expert (one sort), each expert runs one matmul over all of its tokens,
    and results are scattered back weighted by the gate: no Python loop over tokens, and experts
    no token chose are never read (decode touches only the chosen experts' weights). At inference on
    CPU the fused routed-experts kernel does all of this in one call (EXPERT_KERNEL_MAX_TOKENS);
    without it, experts small enough that a call costs more than reading them run all at once when
    most are busy (`all_at_once_threshold`); V2/V3-sized experts never do.
    """

    # Inference may run every expert at once when most are busy (`all_at_once_threshold`); quantized
    # stacks cannot (their per-row scales differ between experts that share an output row).
    all_at_once = True

    panels: tuple[torch.Tensor, torch.Tensor] | None = None  # the stacks in panels (`stream_panels`)

    def __init__(self, config: ModelConfig):
        super().__init__()
        num_experts, dim, hidden = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        # The matmul of every expert; FP8 training swaps in `nanoseek.fp8.fp8_linear` (train/precision.py).
        self.linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = linear
        self.scratch = ExpertScratch()  # CPU mixed-precision training buffers, not state

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden], weights/indices [tokens, k] -> [tokens, hidden] in the compute dtype."""
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weights_require_grad())):
            if (kernels := cpu_ops.for_inference(x)) is not None:
                dtype = compute_dtype(x)
                stacks = self.streamable_stacks(dtype)
                if stacks is not None and (stacks[0].dtype == torch.float32 or indices.shape[0] <= EXPERT_KERNEL_MAX_TOKENS):
                    gate_up, down, *scales = stacks
                    return kernels.routed_experts(x.to(dtype), gate_up, down, indices, weights, *(scales or (None, None)),
                                                  *(self.stream_panels(dtype) or (None, None)))
            if self.all_at_once_pays(indices):
                return self.all_experts_forward(x, weights, indices)
            if indices.numel() <= FEW_PAIRS:
                return self.few_tokens_forward(x, weights, indices)
        flat_indices = indices.flatten()
        order = flat_indices.argsort(stable=True)
        counts = torch.bincount(flat_indices, minlength=self.num_experts).tolist()
        grouped_input = dispatch_slots(x.to(compute_dtype(x)), order, indices.shape[1])
        return combine_slots(self.grouped_forward(grouped_input, counts), weights, order)

    def weights_require_grad(self) -> bool:
        return self.gate_up_proj.requires_grad

    def expert_bytes(self) -> int:
        """Bytes of one expert's two matrices."""
        return (self.gate_up_proj[0].numel() + self.down_proj[0].numel()) * self.gate_up_proj.element_size()

    def expert_dtype(self) -> torch.dtype:
        return self.gate_up_proj.dtype

    def all_at_once_pays(self, indices: torch.Tensor) -> bool:
        """Whether this step runs every expert: on CPU when enough experts are busy (the constants above),
        on CUDA for few tokens of small stacks (GPU_DENSE_*). fp32/bf16 only: an idle fp16 expert could
        overflow to inf, which a zero gate weight turns into NaN; not under autocast, which would convert
        every expert's weights at every call, not only the chosen ones."""
        device = indices.device.type
        if not self.all_at_once or torch.is_autocast_enabled(device) or self.expert_dtype() == torch.float16:
            return False
        if device == "cuda":
            stack_bytes = self.expert_bytes() * self.num_experts
            return indices.shape[0] <= GPU_DENSE_MAX_TOKENS and stack_bytes <= GPU_DENSE_MAX_STACK_BYTES
        if device != "cpu":
            return False
        needed = all_at_once_threshold(self.expert_bytes(), self.num_experts, indices.shape[0])
        return indices.numel() >= needed and len(set(indices.flatten().tolist())) >= needed

    def all_experts_forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Every expert on every token (inference, most experts busy): the gate/up matrices of all experts
        as one matmul (a view of the stack), the gate weights (zero for experts a token did not choose)
        scaling the activations, and one batched matmul over the down matrices, summed over experts."""
        tokens, (experts, rows, dim) = x.shape[0], self.gate_up_proj.shape
        x = x.to(compute_dtype(x))
        projected = self.linear(x, self.gate_up_proj.view(experts * rows, dim)).view(tokens, experts, 2, rows // 2)
        activations = self.gated_activations(projected, weights, indices)
        return torch.bmm(activations.transpose(0, 1), self.down_proj.transpose(1, 2).to(activations.dtype)).sum(dim=0)

    @staticmethod
    def gated_activations(projected: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up * gate weight per (token, expert): projected [tokens, E, 2, I] -> [tokens, E, I]."""
        gates = projected.new_zeros(projected.shape[:2]).scatter_(1, indices, weights.to(projected.dtype))
        return F.silu(projected[:, :, 0]) * projected[:, :, 1] * gates.unsqueeze(-1)

    def few_tokens_forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Decoding a few tokens (batch-1 steps, speculative verification): each chosen expert runs once
        on the tokens that chose it, and each token's k outputs are combined by one batched [1, k] x
        [k, hidden] matmul. Cheaper than grouping (a sort, a gather and a scatter: about fifteen ops per
        MoE layer) when there are only a handful of (token, expert) pairs."""
        gate_up, down = self.expert_weights()
        x = x.to(compute_dtype(x))
        choices = indices.tolist()
        users: dict[int, list[int]] = {}  # expert -> the tokens that chose it
        for token, experts in enumerate(choices):
            for expert in experts:
                users.setdefault(expert, []).append(token)
        by_pair: dict[tuple[int, int], torch.Tensor] = {}  # [1, hidden] rows: 2-D inputs keep the GEMM kernels
        for expert, tokens in users.items():
            if len(tokens) == len(choices):
                inputs = x
            elif len(tokens) == 1:
                inputs = x[tokens[0] : tokens[0] + 1]
            else:
                inputs = x[tokens]
            outputs = self.expert_forward(inputs, gate_up[expert], down[expert])
            by_pair.update(((token, expert), output) for token, output in zip(tokens, outputs.split(1), strict=True))
        stacked = torch.cat([by_pair[token, expert] for token, experts in enumerate(choices) for expert in experts])
        return torch.bmm(weights.to(stacked.dtype).unsqueeze(1), stacked.view(*indices.shape, -1)).squeeze(1)

    def streamable_stacks(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...] | None:
        """What the fused CPU kernel streams for activations of `dtype`: the stacks as plain contiguous
        [E, 2I, D] and [E, D, I] tensors of that dtype (fp32 or bf16), followed by their fp32 row scales
        [E, 2I] and [E, D] for int8 stacks; None where it cannot (another dtype, FP8's matmul swapped in)."""
        stacks = self.gate_up_proj, self.down_proj
        if self.linear is not linear or dtype not in (torch.float32, torch.bfloat16):
            return None
        return stacks if all(s.dtype == dtype and s.is_contiguous() for s in stacks) else None

    def stream_panels(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stacks in panels [E, ceil(out / 32), in, 32] that the kernel streams instead of the plain
        ones for activations of `dtype`, where packing made them (`nanoseek.infer.packing.PackedRoutedExperts`)."""
        return self.panels if self.panels is not None and self.panels[0].dtype == dtype else None

    def grouped_forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Every expert on its run of rows: `x` [tokens * k, hidden] holds counts[e] rows for expert e."""
        if self.linear is linear and torch.is_grad_enabled() and self.gate_up_proj.requires_grad:
            # Training: kernels.py. Reused buffers pay off on CPU; a GPU's caching allocator reuses memory itself.
            scratch = self.scratch if x.device.type == "cpu" else None
            return grouped_swiglu(x, self.gate_up_proj, self.down_proj, counts, scratch)
        gate_up, down = self.expert_weights()
        # One split (not a slice per expert): slicing makes autograd zero-fill a full-size gradient per slice.
        outputs = [
            self.expert_forward(expert_input, gate_up[expert], down[expert])
            for expert, (expert_input, count) in enumerate(zip(x.split(counts), counts, strict=True))
            if count
        ]
        return torch.cat(outputs)

    def expert_weights(self) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]:
        """The (gate_up, down) weights of every expert, indexable by expert id.

        With gradients: one unbind per stack (not one index per expert), because indexing a parameter
        per expert makes autograd materialize a full-size zero gradient for every expert it touches.
        Without (inference): the stacks themselves, so only the chosen experts are indexed.
        """
        if torch.is_grad_enabled() and self.gate_up_proj.requires_grad:
            return self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        return self.gate_up_proj, self.down_proj

    def expert_forward(self, x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """One SwiGLU expert: gate_up [2I, D] (gate rows first), down [D, I]."""
        return self.linear(silu_and_mul(self.linear(x, gate_up)), down)

    def naive_forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Executable specification: every token through each of its experts one at a time."""
        out = torch.zeros_like(x)
        for token in range(x.shape[0]):
            for slot in range(indices.shape[1]):
                expert = int(indices[token, slot])
                expert_out = self.expert_forward(x[token : token + 1], self.gate_up_proj[expert], self.down_proj[expert])
                out[token] += weights[token, slot].to(x.dtype) * expert_out[0]
        return out


class MoE(nn.Module):
    """A DeepSeekMoE feed-forward layer: router (`gate`), routed `experts`, `shared_experts`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        shared = config.n_shared_experts or 0
        self.shared_experts = (
            SwiGLU(config.hidden_size, shared * config.moe_intermediate_size) if shared else None
        )

    def forward(self, x: torch.Tensor, balance_loss: bool = False) -> tuple[torch.Tensor, RouterStats]:
        """x [batch, seq, hidden] -> (output, stats). `balance_loss` computes V3's sequence-wise loss."""
        batch, seq, dim = x.shape
        flat = x.reshape(-1, dim)
        weights, indices, scores = self.gate(flat)
        out = self.experts(flat, weights, indices).view(batch, seq, dim)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        loss = self.sequence_balance_loss(scores, indices, batch) if balance_loss else None
        return out, RouterStats(indices.detach(), self.gate.num_experts, loss)

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
        """sum_i f_i P_i per sequence, averaged over the batch (V3 report eq. 17-20).

        f_i = N_r / (K_r T) * (tokens of the sequence routed to i); P_i = mean over the sequence of
        the scores normalized over all experts.
        """
        num_experts, top_k = self.gate.num_experts, self.gate.top_k
        scores = scores.view(batch, -1, num_experts)
        seq = scores.shape[1]
        chosen = torch.zeros_like(scores).scatter_(2, indices.view(batch, seq, top_k), 1.0)
        fraction = chosen.sum(dim=1) * num_experts / (top_k * seq)
        probability = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return (fraction * probability).sum(dim=-1).mean()
