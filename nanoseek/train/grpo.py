"""`nanoseek grpo`: Group Relative Policy Optimization with rule-based rewards (DeepSeekMath §4, R1 §2.2).

    nanoseek grpo --model runs/cold-start/checkpoints/step_00000300 --from-tasks 5000 --name grpo \\
        max_steps=200 lr=2e-5 num_generations=8 loss_type=dapo beta=0.0
    nanoseek grpo --model DIR --data prompts.jsonl rewards=accuracy,my_rewards:brevity reward_weights=[1,0.2]

Each optimizer step (TRL's GRPOTrainer, whose names and defaults these follow):
1. Rollout. Take the next prompts, sample G = `num_generations` completions of each through the
   inference engine (continuous batching, paged KV cache), with the policy's own module: the engine
   always samples with the weights being trained, in eval mode under no_grad (training-only paths
   such as the MoE balance loss never run there). Completions of a prompt share a group id.
2. Score with every reward function (`nanoseek.train.rewards`): r = sum_k w_k r_k.
3. Advantage, per completion and shared by its tokens: A_i = (r_i - mean(r_group)) / (std + 1e-4),
   the std taken over the group (`scale_rewards=group`, GRPO), the batch (`batch`, Lite-PPO) or not
   at all (`none`, Dr. GRPO).
4. Loss per completion token t, with rho = pi_theta / pi_old computed at the sampling temperature:
       l_t = -min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta * KL_t,
       KL_t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1          (Schulman's k3; no reference
                                                                      model is loaded when beta = 0)
   aggregated by `loss_type`: `grpo` = mean over each sequence's tokens, then over sequences
   (DeepSeekMath; length-biased); `dr_grpo` = sum / (sequences x max_completion_length) (Dr. GRPO);
   `dapo` = sum / tokens of the whole optimizer step (DAPO; TRL's default).
   A rollout feeds `steps_per_generation` optimizer steps and is reused `num_iterations` times;
   pi_old is the policy that sampled it (its log-probs are kept). With one on-policy update
   rho = 1, so the loss value is about 0 while its gradient is not: watch the rewards. Completions
   whose gradient is exactly zero (advantage 0 at beta = 0: a group that scored all-equal) are not
   run through the update at all; the normalisers still count them. MTP depths stay frozen.
The optimizer, schedule, precision, checkpoints, metrics and the MoE router-bias update (frozen by
default here: GRPO_TRAIN_DEFAULTS) are the shared `Trainer`'s; the rollouts are its batch source.
Per step the run logs reward mean/std per function, the share of all-wrong / all-correct groups,
completion lengths and truncation, entropy, KL, clip fractions and the time split between generation
and training; every `eval_every` steps (and before the first) held-out greedy accuracy, pass@k and
maj@k. The run is single-process.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.data.loader import EpochLoader, EpochSampler
from nanoseek.data.tasks import TASKS, Problem, make_mixed_problems
from nanoseek.errors import ConfigError, DataError, TrainingError
from nanoseek.eval.evaluate import heldout_problems
from nanoseek.infer.engine import FINISH_LENGTH, Engine
from nanoseek.infer.packing import packed_while
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import CausalLM
from nanoseek.model.attention import DocumentMask, fused_documents
from nanoseek.model.kernels import linear_token_logprobs
from nanoseek.model.layers import is_plain_linear
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import parallel
from nanoseek.train.rewards import RewardFunction, check_reward_columns, compute_rewards, resolve_reward
from nanoseek.train.sft import (
    EVAL_SEED,
    check_context,
    check_model_dir,
    evaluation_due,
    heldout_evaluator,
    load_policy,
    resume_point,
    split_overrides,
    write_run_config,
)
from nanoseek.train.trainer import EXPERT_LOAD, Batch, MetricsLog, TrainConfig, Trainer, output_metrics

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPSILON = 1e-4  # TRL's: a group with one distinct reward gets A = 0, not 0 / 0


@dataclass
class GRPOConfig:
    """What GRPO adds to `TrainConfig`; `global_batch_size` counts completions per optimizer step."""

    num_generations: int = 8  # G completions per prompt
    max_prompt_length: int = 256  # longer prompts are an error (checked before training)
    max_completion_length: int = 128
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same temperature
    top_p: float = 1.0  # top_p / top_k truncate sampling only: log-probs use the temperature alone (as TRL)
    top_k: int = 0
    steps_per_generation: int = 1  # optimizer steps fed by one rollout
    num_iterations: int = 1  # mu: times each rollout is used
    epsilon: float = 0.2  # lower clip range
    epsilon_high: float | None = None  # upper clip range; None = epsilon (DAPO's clip-higher: 0.28)
    beta: float = 0.0  # k3 KL coefficient; 0 loads no reference model
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False  # completions without EOS get no loss (DAPO overlong filtering)
    rewards: str = "accuracy,format"  # built-in names or module:function, comma-separated
    reward_weights: list[float] | None = None  # one per reward; None = all 1 (R1 sums them)
    overlong_buffer: int = 0  # the `overlong` reward's buffer in tokens; 0 = max_completion_length // 4
    eval_problems: int = 100  # held-out task problems evaluated every eval_every steps (0: none)
    eval_samples: int = 8  # k of pass@k / maj@k at the sampling temperature (0: greedy accuracy only)

    def __post_init__(self) -> None:
        problems = []
        if self.num_generations < 2:
            problems.append(f"num_generations must be >= 2 (advantages compare completions of one prompt), got {self.num_generations}")
        for name in ("max_prompt_length", "max_completion_length", "steps_per_generation", "num_iterations"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (log-probs are taken at it), got {self.temperature}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            problems.append("epsilon must be in (0, 1) and epsilon_high > 0")
        if self.beta < 0 or self.overlong_buffer < 0 or self.eval_problems < 0 or self.eval_samples < 0:
            problems.append("beta, overlong_buffer, eval_problems and eval_samples must be >= 0")
        if self.loss_type not in LOSS_TYPES:
            problems.append(f"loss_type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.scale_rewards not in SCALE_REWARDS:
            problems.append(f"scale_rewards {self.scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_names):
            problems.append(f"{len(self.reward_weights)} reward_weights for {len(self.reward_names)} rewards ({self.rewards})")
        if problems:
            raise ConfigError("invalid GRPO config: " + "; ".join(problems))

    @property
    def reward_names(self) -> list[str]:
        return [name.strip() for name in self.rewards.split(",") if name.strip()]

    @property
    def old_logprobs_needed(self) -> bool:
        """Whether updates see data sampled before an earlier update (then pi_old must be kept)."""
        return self.num_iterations > 1 or self.steps_per_generation > 1


# Where GRPO departs from pretraining's defaults: a constant small lr (the nano preset collapsed at
# 5e-5 and above in benchmarks/grpo_learning.py), no decay, 8 prompts x 8 completions per step, and the
# router's correction bias frozen: rollouts of a few task prompts are a skewed sample of the routing
# the bias was balanced on, and chasing it moves every token's expert choice under the policy. On the
# speedrun's cold start (nano, 32 prompts x 8, 40 steps) the bias update alone, at lr ~ 0, took held-out
# greedy accuracy from 22% to 18% in 20 steps; frozen, it stayed at 22%. `bias_update_speed=1e-3`
# turns it back on.
GRPO_TRAIN_DEFAULTS = {"lr": 2e-5, "lr_schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                       "global_batch_size": 64, "micro_batch_size": 32, "max_steps": 200, "eval_every": 25,
                       "checkpoint_every": 100, "bias_update_speed": 0.0}


# ----- advantages and the loss --------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, scale: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean of its group) / (std + 1e-4), groups given by explicit ids (never by position).

    rewards [N] (NaN = unscorable: left out of the group statistics, advantage 0); group_ids [N].
    scale: "group" (std within the group), "batch" (std over the batch) or "none" (no division).
    Stds are unbiased, as torch.std and TRL.
    """
    valid = ~rewards.isnan()
    values = rewards.nan_to_num(0.0).double()
    _, group = torch.unique(group_ids, return_inverse=True)
    size = int(group.max()) + 1

    def group_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.float64).index_add_(0, group, x)

    count = group_sum(valid.double())
    mean = group_sum(values * valid) / count.clamp_min(1)
    centered = (values - mean[group]) * valid
    if scale == "group":
        centered = centered / ((group_sum(centered**2) / (count - 1).clamp_min(1)).sqrt()[group] + STD_EPSILON)
    elif scale == "batch":
        centered = centered / (values[valid].std() + STD_EPSILON if int(valid.sum()) > 1 else 1.0)
    elif scale != "none":
        raise ConfigError(f"scale_rewards {scale!r} is not one of {', '.join(SCALE_REWARDS)}")
    return centered.float()


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_tokens: float | torch.Tensor | None = None,
    num_sequences: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate, aggregated by `loss_type`; returns (loss, detached statistics).

    logprobs / old_logprobs / ref_logprobs [B, T]: per-token log-probs of the completion tokens under
    the policy, the sampling policy and the reference; advantages [B]; mask [B, T] (1 = a completion
    token that is trained). `max_completion_length` is dr_grpo's constant. The normalisers default to
    this batch: `num_tokens` (dapo) its trained tokens, `num_sequences` (grpo, dr_grpo) its rows;
    under gradient accumulation pass the whole optimizer step's count divided by the number of
    micro-batches, so that the step's loss is that of one big batch.
    """
    mask = mask.to(logprobs.dtype)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high)
    advantage = advantages[:, None].to(logprobs.dtype)
    per_token = -torch.min(ratio * advantage, clipped * advantage)
    stats: dict[str, torch.Tensor] = {}
    if beta:
        if ref_logprobs is None:
            raise TrainingError("beta > 0 needs the reference model's log-probs")
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl, mask)
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum() / sequences
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise TrainingError("loss_type dr_grpo needs max_completion_length")
        loss = (per_token * mask).sum() / (sequences * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (mask.sum().clamp_min(1) if num_tokens is None else num_tokens)
    else:
        raise ConfigError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    low = (ratio < 1 - epsilon) & (advantage < 0)
    high = (ratio > 1 + epsilon_high) & (advantage > 0)
    stats["clip_ratio/low_mean"] = _masked_mean(low, mask)
    stats["clip_ratio/high_mean"] = _masked_mean(high, mask)
    stats["clip_ratio/region_mean"] = _masked_mean(low | high, mask)
    return loss, stats


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values.detach().to(mask.dtype) * mask).sum() / mask.sum().clamp_min(1)


def completion_logprobs(
    model: nn.Module, batch: Batch, temperature: float, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    """Per-token log-probs [B, T] (0 outside `completion_mask`) of the completion tokens at the sampling
    temperature, log softmax(logits / T) as the sampler drew them; optionally the entropy of those
    distributions (detached). Logits are computed only at completion positions. Returns the model
    output too (its router statistics drive the MoE bias update)."""
    mask = batch["completion_mask"]
    hidden, output, packed = completion_hidden_states(model, batch)
    targets, head = batch["targets"][mask], model.lm_head
    if is_plain_linear(head) and head.bias is None:  # fused with the head: no [tokens, vocab] log-softmax kept
        rows = hidden.shape[0]
        if packed and rows % PACKED_MULTIPLE:  # a repeated shape for the head's products too (zero rows, dropped)
            padding = PACKED_MULTIPLE - rows % PACKED_MULTIPLE
            hidden, targets = F.pad(hidden, (0, 0, 0, padding)), F.pad(targets, (0, padding))
        chosen, values = linear_token_logprobs(hidden, head.weight, targets, temperature, entropy)
        chosen, values = chosen[:rows], None if values is None else values[:rows]
    else:  # a quantized or otherwise replaced head
        logits = head(hidden).float()
        if temperature != 1.0:
            logits = logits / temperature
        logprobs_all = logits.log_softmax(dim=-1)
        chosen = logprobs_all.gather(1, targets[:, None]).squeeze(1)
        values = None
        if entropy:
            with torch.no_grad():
                values = -(logprobs_all.exp() * logprobs_all).sum(dim=-1)
    logprobs = torch.zeros(mask.shape, dtype=chosen.dtype, device=chosen.device).masked_scatter(mask, chosen)
    token_entropy = None if values is None else torch.zeros_like(logprobs).masked_scatter(mask, values)
    return logprobs, token_entropy, output


# A packed update's length is rounded up to a multiple of this (one padding document at the end), and the
# head's rows likewise: oneDNN's products are prepared per shape and taken from a shape's second use on
# (kernels.repeated_shape), and a rollout's token count changes every step. 128 costs a few padding
# tokens (<= 3% of the bench's ~3,700) for a handful of shapes that recur.
PACKED_MULTIPLE = 128


def completion_hidden_states(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Any, bool]:
    """The final hidden states at the completion positions, [tokens, hidden] in row order, the model
    output, and whether the rows were packed. Where packed documents take the fused attention
    (`fused_documents`: CPU, fp32) the rows go through the model as one sequence of documents
    (`shared_prompt_layout`): each prompt once, each completion a document that sees it, no padding
    but up to PACKED_MULTIPLE; else as the padded batch."""
    ids, mask, lengths = batch["input_ids"], batch["completion_mask"], batch.get("lengths")
    dtype = next(model.parameters()).dtype
    if lengths is None or "prompt_lengths" not in batch or not fused_documents(ids.device, dtype, int(lengths.max())):
        output = model(ids, logits_to_keep=1)
        return output.hidden_states[mask], output, False
    tokens, positions, documents, completions = shared_prompt_layout(batch, PACKED_MULTIPLE)
    output = model(tokens[None], positions=positions[None], document_ids=documents, logits_to_keep=1)
    return output.hidden_states[0][completions], output, True


def shared_prompt_layout(batch: Batch, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, DocumentMask, torch.Tensor]:
    """A micro-batch's rows (`pad_rows`: with their `lengths` and `prompt_lengths`) as one packed sequence:
    every distinct prompt once (rows of one of `groups` share theirs, if the batch has them and the
    tokens agree), then each row's completion tokens as a document that also sees its prompt; no
    padding but a last document of pad tokens that rounds the length up to a `multiple`. In the
    `qwen2-nano` bench (G = 8, ~10-token prompts, up to 64 completion tokens) that is ~3,700 positions
    instead of 64 x 74 = 4,736.

    Returns the packed token ids [N], their positions [N] (as in their row: the same rotary angles),
    the DocumentMask [1, N], and, in the row-major order of `completion_mask`, the packed index of each
    completion position's hidden state (a completion's first token is predicted from its prompt's last
    one, shared by the group)."""
    ids, lengths, prompts = batch["input_ids"], batch["lengths"], batch["prompt_lengths"]
    device, width = ids.device, ids.shape[1]
    groups = batch["groups"].tolist() if "groups" in batch else list(range(len(ids)))
    completed = (lengths >= prompts).tolist()  # rows with a completion position (all, from a rollout)
    leaders: list[int] = []  # the row whose prompt tokens each row's completion sees
    first_of: dict[tuple[int, int], int] = {}
    for row, key in enumerate(zip(groups, prompts.tolist(), strict=True)):
        leader = first_of.setdefault(key, row) if completed[row] else row
        if leader != row and not torch.equal(ids[row, : key[1]], ids[leader, : key[1]]):
            leader = row  # same group, other tokens: not shared
        leaders.append(leader)
    rows = torch.arange(len(ids), device=device)
    leader, completed = torch.tensor(leaders, device=device), torch.tensor(completed, device=device)
    runs_prompt = (leader == rows) & completed
    own = torch.where(completed, lengths - prompts, 0)
    # segments in order: a leader's prompt, then each row's own completion tokens
    segment_row = torch.stack((rows, rows), dim=1).flatten()
    segment_col = torch.stack((torch.zeros_like(prompts), prompts), dim=1).flatten()
    segment_len = torch.stack((torch.where(runs_prompt, prompts, 0), own), dim=1).flatten()
    segment_start = segment_len.cumsum(0) - segment_len
    segment = torch.repeat_interleave(torch.arange(len(segment_len), device=device), segment_len)
    offset = torch.arange(len(segment), device=device) - segment_start[segment]
    source = segment_row[segment] * width + segment_col[segment] + offset
    positions = segment_col[segment] + offset
    tokens = ids.flatten()[source]
    prompt_start = segment_start[0::2][leader]  # where each row's prompt lies in the packed sequence
    is_completion = segment % 2 == 1
    seen = torch.stack((prompt_start, prompt_start + prompts), dim=1)[segment_row[segment]]
    prefix = torch.where(is_completion[:, None], seen, 0)
    if len(tokens) % multiple:  # the padding document
        padding = multiple - len(tokens) % multiple
        tokens = torch.cat((tokens, tokens.new_zeros(padding)))
        positions = torch.cat((positions, torch.arange(padding, device=device)))
        segment = torch.cat((segment, segment.new_full((padding,), len(segment_len))))
        prefix = torch.cat((prefix, prefix.new_zeros(padding, 2)))
    mask = DocumentMask(segment[None], prefix[None])
    # a row's completion positions: its prompt's last token, then its own tokens but the last
    entries = torch.where(completed, own + 1, 0)
    entry_row = torch.repeat_interleave(rows, entries)
    k = torch.arange(len(entry_row), device=device) - (entries.cumsum(0) - entries)[entry_row]
    completions = torch.where(k == 0, prompt_start[entry_row] + prompts[entry_row] - 1,
                              segment_start[1::2][entry_row] + k - 1)
    return tokens, positions, mask, completions


def make_loss_fn(config: GRPOConfig):
    """The Trainer's `loss_fn` for rollout micro-batches (see `Rollouts`)."""

    def grpo_loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        logprobs, entropy, output = completion_logprobs(model, batch, config.temperature, entropy=True)
        trained = batch["loss_mask"]
        loss, stats = grpo_loss(
            logprobs, batch["old_logprobs"] if "old_logprobs" in batch else logprobs.detach(), batch["advantages"],
            trained, batch.get("ref_logprobs"), config.beta, config.epsilon, config.epsilon_high, config.loss_type,
            config.max_completion_length, batch["num_tokens"], batch["num_sequences"],
        )
        sampled = batch["completion_mask"].float()
        # How far the engine's log-probs are from this forward's: ~0 on the first update of a
        # rollout (the engine sampled with these weights), the policy's drift on later ones.
        stats["sampling/logp_diff_mean"] = _masked_mean((logprobs.detach() - batch["engine_logprobs"]).abs(), sampled)
        stats["entropy"] = _masked_mean(entropy, sampled)
        metrics = output_metrics(output)
        if EXPERT_LOAD in metrics:  # MTP depths do not run here: their routers see no tokens, keep their bias
            load = metrics[EXPERT_LOAD]
            missing = len(model.moe_layers()) - len(load)
            metrics[EXPERT_LOAD] = torch.cat((load, load.new_zeros(missing, load.shape[1])))
        return loss, {**stats, **metrics}

    return grpo_loss_fn


# ----- rollouts: the trainer's batch source ---------------------------------------------------------------
@dataclass
class Rollout:
    """One rollout, flat over its completions (G consecutive ones per prompt)."""

    group_ids: list[int]  # the dataset row of each completion's prompt
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    engine_logprobs: list[list[float]]
    truncated: list[bool]


class Rollouts(EpochLoader):
    """GRPO's batch source for the `Trainer`: micro-batches of scored completions.

    When its queue is empty it takes the next `prompts_per_rollout` prompts (a seeded permutation
    per epoch), samples G completions each through `engine`, scores them, computes advantages and
    cuts the rollout into micro-batches: `steps_per_generation` optimizer steps' worth, queued
    `num_iterations` times. Its position (epoch, batch, rollouts made) is saved in checkpoints; a
    resumed run starts with a fresh rollout.

    Micro-batch tensors: input_ids [b, S] (prompt + completion, right-padded), targets [b, S] (the
    next token), completion_mask and loss_mask [b, S] (positions whose next token is a completion
    token that is trained), advantages [b], engine_logprobs [b, S] (the sampler's), the step's
    normalisers num_tokens [] and num_sequences [], and old_logprobs / ref_logprobs when needed.
    Rows with zero gradient are left out (`collate`); entropy and clip fractions are logged over the
    rows that are run.
    """

    def __init__(self, rows: Sequence[dict], prompt_token_ids: Sequence[list[int]], engine: Engine,
                 trainer: Trainer, reward_functions: Sequence[RewardFunction], config: GRPOConfig,
                 reference: CausalLM | None = None):
        self.rows, self.prompt_token_ids = rows, prompt_token_ids
        self.engine, self.trainer, self.config, self.reference = engine, trainer, config, reference
        self.reward_functions = list(reward_functions)
        self.weights = config.reward_weights or [1.0] * len(self.reward_functions)
        completions = trainer.config.global_batch_size * config.steps_per_generation
        if completions % config.num_generations:
            raise ConfigError(
                f"global_batch_size x steps_per_generation = {completions} completions per rollout is not a "
                f"multiple of num_generations={config.num_generations}"
            )
        self.prompts_per_rollout = completions // config.num_generations
        self.sampler = EpochSampler(len(rows), self.prompts_per_rollout, trainer.config.seed)
        self.rollouts_made = 0
        self.skipped = 0  # rows of the current rollout not run because their gradient is zero
        self.queue: deque[Batch] = deque()
        self.metrics: dict[str, float] = {}

    def __next__(self) -> Batch:
        if not self.queue:
            self.queue.extend(self.make_batches())
        return self.queue.popleft()

    def pop_metrics(self) -> dict[str, float]:
        """Statistics of the rollout made since the last call (empty if none was made)."""
        metrics, self.metrics = self.metrics, {}
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rollouts_made": self.rollouts_made}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.rollouts_made = state["rollouts_made"]
        self.queue.clear()

    # ----- one rollout ----------------------------------------------------------------------------
    def sample(self, indices: Sequence[int]) -> Rollout:
        """G completions of each prompt through the engine, seeded by (seed, rollout, prompt)."""
        config = self.config
        base = (self.trainer.config.seed * 1_000_003 + self.rollouts_made) * self.prompts_per_rollout
        params = [
            SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                           max_tokens=config.max_completion_length, logprobs=0, logprobs_mode="processed",
                           seed=(base + position) % 2**63)
            for position in range(len(indices))
        ]
        with packed_while(self.engine.model):  # the policy's current weights, packed for decoding and put back after
            outputs = self.engine.generate([self.prompt_token_ids[i] for i in indices], params, n=config.num_generations)
        rollout = Rollout([], [], [], [], [], [])
        for index, output in zip(indices, outputs, strict=True):
            for completion in output.outputs:
                rollout.group_ids.append(int(index))
                rollout.prompt_ids.append(output.prompt_token_ids)
                rollout.completion_ids.append(completion.token_ids)
                rollout.texts.append(completion.text)
                rollout.engine_logprobs.append(completion.logprobs)
                rollout.truncated.append(completion.finish_reason == FINISH_LENGTH)
        return rollout

    @torch.no_grad()
    def make_batches(self) -> list[Batch]:
        config, trainer, model = self.config, self.trainer, self.trainer.model
        start = time.perf_counter()
        indices = self.sampler.next_batch()
        model.eval()
        with trainer.precision.autocast():
            rollout = self.sample(indices)
        generation_seconds = time.perf_counter() - start
        self.rollouts_made += 1

        rows = [self.rows[i] for i in rollout.group_ids]
        columns = {key: [row.get(key) for row in rows] for key in self.rows[0] if key != "prompt"}
        rewards = compute_rewards(self.reward_functions, self.weights, [row["prompt"] for row in rows],
                                  rollout.texts, rollout.completion_ids, columns)
        group_ids = torch.tensor(rollout.group_ids)
        advantages = group_advantages(rewards.total, group_ids, config.scale_rewards)
        self.skipped = 0
        batches = self.collate(rollout, advantages)
        for batch in batches:
            with trainer.precision.autocast():
                if config.old_logprobs_needed:
                    batch["old_logprobs"] = completion_logprobs(model, _on(batch, trainer.device), config.temperature)[0].float().cpu()
                if self.reference is not None:
                    batch["ref_logprobs"] = completion_logprobs(self.reference, _on(batch, trainer.device), config.temperature)[0].float().cpu()
        model.train()
        self.metrics = rollout_metrics(rollout, rewards, group_ids, generation_seconds, time.perf_counter() - start)
        self.metrics["frac_rows_skipped"] = self.skipped / len(rollout.texts)
        return batches * config.num_iterations

    def collate(self, rollout: Rollout, advantages: torch.Tensor) -> list[Batch]:
        """Cut the rollout into `grad_accum_steps` micro-batches per optimizer step, in order (a step
        holds whole groups when global_batch_size is a multiple of G), with each step's normalisers.

        Rows whose gradient is exactly zero are not run: no trained token (masked truncation), or
        advantage 0 with beta = 0 (e.g. a group whose completions all scored the same), since then
        -min(rho A, clip(rho) A) = 0 at every token. They still count in the normalisers, so the
        loss and its gradient equal those of the full batch.
        """
        config, accumulation = self.config, self.trainer.grad_accum_steps
        per_step = self.trainer.config.global_batch_size
        trained = [not (config.mask_truncated_completions and cut) for cut in rollout.truncated]
        batches = []
        for start in range(0, len(rollout.texts), per_step):
            rows = range(start, min(start + per_step, len(rollout.texts)))
            tokens = sum(len(rollout.completion_ids[i]) for i in rows if trained[i])
            normalisers = {"num_tokens": torch.tensor(max(tokens, 1) / accumulation),
                           "num_sequences": torch.tensor(len(rows) / accumulation)}
            kept = [i for i in rows if trained[i] and (config.beta > 0 or advantages[i] != 0)]
            self.skipped += len(rows) - len(kept)
            for part in range(accumulation):
                share = kept[part * len(kept) // accumulation : (part + 1) * len(kept) // accumulation]
                batch = self.pad_rows(rollout, share or [rows[0]], advantages)
                if not share:  # a placeholder so the step still has its micro-batches: nothing trained
                    batch["loss_mask"].zero_()
                batches.append({**batch, **normalisers})
        return batches

    def pad_rows(self, rollout: Rollout, rows: Sequence[int], advantages: torch.Tensor) -> Batch:
        """Prompt + completion of each row, right-padded, with the masks and per-token tensors."""
        pad = self.engine.tokenizer.pad_id if self.engine.tokenizer.pad_id is not None else 0
        prompts = torch.tensor([len(rollout.prompt_ids[i]) for i in rows])
        totals = prompts + torch.tensor([len(rollout.completion_ids[i]) for i in rows])
        width = int(totals.max()) - 1
        batch = {
            "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
            "targets": torch.zeros((len(rows), width), dtype=torch.long),
            "completion_mask": torch.zeros((len(rows), width), dtype=torch.bool),
            "engine_logprobs": torch.zeros((len(rows), width)),
            "advantages": advantages[list(rows)],
            "lengths": totals - 1,
            "prompt_lengths": prompts,
            "groups": torch.tensor([rollout.group_ids[i] for i in rows]),
        }
        # every row's prompt + completion as one flat run of tokens, placed with a few indexed writes (a
        # loop of slice assignments per row took ~1 ms for GRPO's 64 rows): position p of row r is an
        # input if p < total - 1 and, from the prompt's end on, the target of position p - 1
        ids = array("q")
        logprobs = array("f")
        for i in rows:
            ids.extend(rollout.prompt_ids[i])
            ids.extend(rollout.completion_ids[i])
            logprobs.extend(rollout.engine_logprobs[i])
        ids = torch.frombuffer(ids, dtype=torch.int64)
        row = torch.repeat_interleave(torch.arange(len(rows)), totals)
        position = torch.arange(len(ids)) - (totals.cumsum(0) - totals)[row]
        inputs = position < totals[row] - 1
        batch["input_ids"][row[inputs], position[inputs]] = ids[inputs]
        completion = position >= prompts[row]
        target_row, target_position = row[completion], position[completion] - 1
        batch["targets"][target_row, target_position] = ids[completion]
        batch["completion_mask"][target_row, target_position] = True
        batch["engine_logprobs"][target_row, target_position] = torch.frombuffer(logprobs, dtype=torch.float32)
        batch["loss_mask"] = batch["completion_mask"].clone()
        return batch


def _on(batch: Batch, device: torch.device) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


def rollout_metrics(rollout: Rollout, rewards, group_ids: torch.Tensor, generation_seconds: float,
                    rollout_seconds: float) -> dict[str, float]:
    """TRL-named statistics of one rollout. A group is all-correct / all-wrong by the first reward
    (accuracy by default): every / no completion scores above 0."""
    metrics: dict[str, float] = {}
    for column, name in enumerate(rewards.names):
        values = rewards.per_function[:, column]
        values = values[~values.isnan()]
        metrics[f"rewards/{name}/mean"] = float(values.mean()) if len(values) else math.nan
        metrics[f"rewards/{name}/std"] = float(values.std()) if len(values) > 1 else 0.0
    _, group = torch.unique(group_ids, return_inverse=True)
    groups = [rewards.total[group == g] for g in range(int(group.max()) + 1)]
    first = rewards.per_function[:, 0].nan_to_num(0.0) > 0
    correct = [first[group == g] for g in range(len(groups))]
    lengths = torch.tensor([len(ids) for ids in rollout.completion_ids], dtype=torch.float)
    truncated = torch.tensor(rollout.truncated)
    metrics.update({
        "reward": float(rewards.total.nanmean()),
        "reward_std": float(torch.stack([g.std() for g in groups]).nanmean()),
        "frac_reward_zero_std": sum(float(g.std()) < 1e-6 for g in groups) / len(groups),
        "frac_all_correct": sum(bool(c.all()) for c in correct) / len(groups),
        "frac_all_wrong": sum(not bool(c.any()) for c in correct) / len(groups),
        "completions/mean_length": float(lengths.mean()),
        "completions/max_length": float(lengths.max()),
        "completions/mean_terminated_length": float(lengths[~truncated].mean()) if bool((~truncated).any()) else 0.0,
        "completions/clipped_ratio": float(truncated.float().mean()),
        "generation_seconds": round(generation_seconds, 4),
        "rollout_seconds": round(rollout_seconds, 4),
    })
    return metrics


# ----- the stage ----------------------------------------------------------------------------------------
@dataclass
class GRPORun:
    """A GRPO run, resolved and checked."""

    train: TrainConfig
    options: GRPOConfig
    model_dir: Path
    tokenizer_dir: Path
    rows: list[dict]
    reward_functions: list[RewardFunction]
    eval_problems: list[Problem]
    run_dir: Path
    resume_from: Path | None


def problem_rows(problems: Sequence[Problem]) -> list[dict]:
    """Built-in task problems as GRPO rows: the prompt as a chat plus the columns the rewards read."""
    return [
        {"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer, "task": p.task,
         "numbers": list(p.numbers), "target": p.target, "language": p.language, "id": p.id}
        for p in problems
    ]


def read_prompts(path: str | Path) -> list[dict]:
    """Rows of a JSONL file: `{"prompt": "text" or [{"role", "content"}, ...], ...other columns}`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not JSON ({error})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)):
                raise DataError(f"{path}:{number}: expected an object with a \"prompt\" (text or a list of messages)")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no prompts")
    keys = set(rows[0])
    for number, row in enumerate(rows, start=1):
        if set(row) != keys:
            raise DataError(f"{path}: row {number} has columns {sorted(row)} but the first row has {sorted(keys)}")
    return rows


def encode_prompts(tokenizer: Tokenizer, rows: Sequence[dict], max_prompt_length: int) -> list[list[int]]:
    """Token ids of each row's prompt (chats through the chat template with a generation prompt; text as
    is, after BOS); ConfigError naming the rows longer than `max_prompt_length`."""
    encoded = [
        tokenizer.encode(row["prompt"], add_special_tokens=True) if isinstance(row["prompt"], str)
        else tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        for row in rows
    ]
    too_long = [(index, len(ids)) for index, ids in enumerate(encoded) if len(ids) > max_prompt_length]
    if too_long:
        shown = ", ".join(f"row {i} ({n} tokens)" for i, n in too_long[:3])
        raise ConfigError(f"{len(too_long)} prompts are longer than max_prompt_length={max_prompt_length}: {shown}; "
                          "raise max_prompt_length or shorten them")
    return encoded


def resolve_grpo_run(
    model: str | Path,
    data: str | Path | None = None,
    from_tasks: int = 0,
    tasks: Sequence[str] = TASKS,
    difficulty: Sequence[int] = (1, 2),
    overrides: Sequence[str] = (),
    name: str = "grpo",
    runs_dir: str | Path = "runs",
    resume: str | bool | None = None,
    tokenizer: str | Path | None = None,
    reward_functions: Sequence[RewardFunction] | None = None,
) -> GRPORun:
    """Parse and check every setting and read the prompts (no model is built yet). `reward_functions`
    (callables) replace the named `rewards` of the overrides; `reward_weights` still apply."""
    train, options = split_overrides(overrides, GRPOConfig, GRPO_TRAIN_DEFAULTS)
    model_dir, tokenizer_dir = check_model_dir(model, tokenizer)
    if (data is None) == (from_tasks <= 0):
        raise ConfigError("give exactly one source of prompts: --data FILE.jsonl or --from-tasks N")
    rows = read_prompts(data) if data is not None else problem_rows(make_mixed_problems("train", from_tasks, train.seed, difficulty, tasks))
    functions = list(reward_functions) if reward_functions is not None else [
        resolve_reward(spec, options.max_completion_length, options.overlong_buffer) for spec in options.reward_names
    ]
    if not functions or (options.reward_weights is not None and len(options.reward_weights) != len(functions)):
        raise ConfigError(f"give one reward_weights entry per reward function ({len(functions)} functions)")
    check_reward_columns(functions, [key for key in rows[0] if key != "prompt"])
    eval_problems = heldout_problems(options.eval_problems, tasks, difficulty, EVAL_SEED) if options.eval_problems else []
    run_dir = Path(runs_dir) / name
    return GRPORun(train, options, model_dir, tokenizer_dir, rows, functions, eval_problems, run_dir,
                   resume_point(run_dir, resume))


def grpo(run: GRPORun) -> dict[str, Any]:
    """Optimize `run.model_dir` with GRPO; returns the last metrics (held-out accuracy included)."""
    config, options = run.train, run.options
    topology = parallel.init_distributed(config.device)
    try:
        if topology.is_distributed:
            raise TrainingError("GRPO runs in one process (the engine samples with whole, unsharded weights): drop torchrun")
        config.seq_len = options.max_prompt_length + options.max_completion_length  # the trainer's FLOP count
        model, tokenizer = load_policy(run.model_dir, run.tokenizer_dir, topology.device)
        check_context(model, config.seq_len)
        prompts = encode_prompts(tokenizer, run.rows, options.max_prompt_length)
        if run.eval_problems:
            encode_prompts(tokenizer, problem_rows(run.eval_problems), options.max_prompt_length)
        model.mtp.requires_grad_(False)  # the policy loss has no next-next-token targets: MTP depths stay as they are
        reference = copy.deepcopy(model).eval().requires_grad_(False) if options.beta > 0 else None

        trainer = Trainer(model, config, run.run_dir, topology=topology, loss_fn=make_loss_fn(options), tokenizer=tokenizer)
        generation_batch = config.global_batch_size * options.steps_per_generation
        engine = Engine(model, tokenizer, max_model_len=config.seq_len, max_num_seqs=min(generation_batch, 256),
                        pack_weights=False)  # the policy keeps training
        rollouts = Rollouts(run.rows, prompts, engine, trainer, run.reward_functions, options, reference)
        if run.resume_from is not None:
            trainer.load_checkpoint(run.resume_from, rollouts)
        write_run_config(run.run_dir, {"stage": "grpo", "model": str(run.model_dir), "train": dataclasses.asdict(config),
                                       "grpo": dataclasses.asdict(options), "prompts": len(run.rows)})
        evaluate = heldout_evaluator(trainer, tokenizer, run.eval_problems, options.max_completion_length,
                                     options.eval_samples, options.temperature, engine=engine)
        before: dict[str, Any] = {}
        if evaluate is not None and run.resume_from is None:
            before = {"step": 0, **evaluate()}
            log = MetricsLog(run.run_dir / "metrics.jsonl")
            log.write(before)
            log.close()

        def on_step(metrics: dict[str, Any]) -> bool:
            metrics.update(rollouts.pop_metrics())
            metrics["training_seconds"] = round(metrics["step_seconds"] - metrics.get("rollout_seconds", 0.0), 4)
            if evaluate is not None and evaluation_due(trainer):
                metrics.update(evaluate())
            return False

        metrics = trainer.fit(rollouts, on_step=on_step)
        summary = {k: metrics[k] for k in ("step", "reward", "val_accuracy", f"val_pass@{options.eval_samples}") if k in metrics}
        if "val_accuracy" in before:
            summary["val_accuracy_before"] = before["val_accuracy"]
        print(json.dumps({"run": str(run.run_dir), **summary, "checkpoint": str(trainer.last_checkpoint)}))
        return metrics
    finally:
        parallel.shutdown()


# ----- command line -------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    from nanoseek.train.sft import add_data_arguments, settings_help

    parser.epilog = settings_help(GRPOConfig, GRPO_TRAIN_DEFAULTS)
    add_data_arguments(parser)
    parser.add_argument("--data", default=None, metavar="FILE",
                        help='JSONL of {"prompt": text or messages, ...columns the rewards read}')
    parser.add_argument("--name", default="grpo", help="run name: outputs go to RUNS_DIR/NAME")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="TrainConfig / GRPOConfig settings, e.g. num_generations=8 beta=0.04 loss_type=grpo")


def cli_main(args: argparse.Namespace) -> int:
    run = resolve_grpo_run(args.model, args.data, args.from_tasks, args.tasks, args.difficulty, args.overrides,
                           args.name, args.runs_dir, args.resume, args.tokenizer)
    grpo(run)
    return 0

