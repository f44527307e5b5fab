"""GRPO: advantages and the clipped loss pinned to their formulas, rollouts that sample with the policy's
own weights in eval mode, evidence of learning, resume, and bad input."""

import copy
import json

import pytest
import torch
from post_training_fixtures import random_model
from train_fixtures import single_thread  # noqa: F401 (autouse: tiny models run single-threaded)

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.infer.engine import Engine
from nanoseek.model import CausalLM
from nanoseek.train.grpo import (
    PACKED_MULTIPLE,
    GRPOConfig,
    Rollout,
    Rollouts,
    completion_logprobs,
    encode_prompts,
    group_advantages,
    grpo,
    grpo_loss,
    make_loss_fn,
    resolve_grpo_run,
    shared_prompt_layout,
)
from nanoseek.train.sft import load_policy
from nanoseek.train.trainer import Trainer

FAST = ["peak_tflops=1", "eval_problems=0", "checkpoint_every=0", "max_completion_length=8", "num_generations=4",
        "global_batch_size=16", "micro_batch_size=8"]


# ----- advantages -------------------------------------------------------------------------------------
def test_group_advantages_follow_explicit_group_ids_not_positions():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, float("nan"), 3.0])
    group_ids = torch.tensor([7, 7, 3, 7, 3, 3, 9, 9])  # interleaved groups
    advantages = group_advantages(rewards, group_ids, "group")
    for group in (7, 3):
        members = group_ids == group
        r = rewards[members]
        assert torch.allclose(advantages[members], (r - r.mean()) / (r.std() + 1e-4), atol=1e-6)
    assert advantages[6] == 0 and advantages[7] == 0  # unscorable row; a group with one scored row
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(group_advantages(rewards[order], group_ids[order], "group"), advantages[order])

    valid = ~rewards.isnan()
    batch = group_advantages(rewards, group_ids, "batch")
    centered = group_advantages(rewards, group_ids, "none")
    assert torch.allclose(batch[valid], centered[valid] / (rewards[valid].std() + 1e-4), atol=1e-6)
    assert centered[[0, 1, 3]].tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3])


def test_identical_rewards_give_zero_advantage():
    advantages = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1]))
    assert advantages.abs().max() == 0


# ----- the loss -----------------------------------------------------------------------------------------
def ragged_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 5, 2, 4])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.5, 2.0]), torch.tensor([0, 0, 1, 1]))
    logprobs = (-torch.rand(4, 5, generator=generator)).requires_grad_()
    return logprobs, advantages, mask


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_at_ratio_one_the_gradient_is_minus_advantage_over_the_normaliser(loss_type):
    logprobs, advantages, mask = ragged_batch()
    loss, stats = grpo_loss(logprobs, logprobs.detach(), advantages, mask, loss_type=loss_type, max_completion_length=5)
    loss.backward()
    weights = {
        "grpo": 1 / (mask.sum(dim=1, keepdim=True) * 4),  # mean over each sequence, then over sequences
        "dr_grpo": torch.full((4, 1), 1 / (4 * 5)),  # sequences x max_completion_length
        "dapo": torch.full((4, 1), 1 / mask.sum()),  # every trained token of the step
    }[loss_type]
    assert torch.allclose(logprobs.grad, -advantages[:, None] * mask * weights, atol=1e-7)
    assert logprobs.grad.abs().sum() > 0
    assert stats["clip_ratio/region_mean"] == 0
    if loss_type == "grpo":  # group-centred advantages: the value is 0, the gradient is not
        assert abs(loss.item()) < 1e-6


def test_dapo_value_is_zero_at_ratio_one_with_equal_lengths_and_uses_the_step_normaliser():
    logprobs, advantages, _ = ragged_batch()
    mask = torch.ones(4, 5, dtype=torch.bool)
    loss, _ = grpo_loss(logprobs, logprobs.detach(), advantages, mask, loss_type="dapo")
    assert abs(loss.item()) < 1e-6
    half, _ = grpo_loss(logprobs, logprobs.detach() - 0.1, advantages, mask, loss_type="dapo", num_tokens=40.0)
    full, _ = grpo_loss(logprobs, logprobs.detach() - 0.1, advantages, mask, loss_type="dapo")
    assert half.item() == pytest.approx(full.item() / 2)  # num_tokens replaces this batch's 20 tokens


def test_asymmetric_clipping_per_token():
    # one token per row: ratio r = exp(logp - old), advantage A, epsilon 0.2, epsilon_high 0.28
    ratios = torch.tensor([1.5, 0.5, 0.5, 1.5, 1.25])
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    logprobs = ratios.log()[:, None].clone().requires_grad_()
    mask = torch.ones(5, 1, dtype=torch.bool)
    loss, stats = grpo_loss(logprobs, torch.zeros(5, 1), advantages, mask, epsilon=0.2, epsilon_high=0.28, loss_type="dapo")
    # per token -min(rA, clip(r)A): clipped at 1.28 (grad 0); clipped at 0.8 (grad 0); unclipped (grad -rA)
    per_token = torch.tensor([-1.28, 0.8, -0.5, 1.5, -1.25])
    assert loss.item() == pytest.approx(per_token.mean().item())
    loss.backward()
    expected_grad = torch.tensor([0.0, 0.0, -0.5, 1.5, -1.25]) / 5
    assert torch.allclose(logprobs.grad[:, 0], expected_grad, atol=1e-6)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    symmetric, _ = grpo_loss(ratios.log()[:, None], torch.zeros(5, 1), advantages, mask, epsilon=0.2, loss_type="dapo")
    assert symmetric.item() == pytest.approx(sum([-1.2, 0.8, -0.5, 1.5, -1.2]) / 5)  # 1.5 and 1.25 clipped at 1.2


def test_k3_kl_to_the_reference_and_its_gradient():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    reference = torch.tensor([[-1.5, -1.0], [-0.5, -2.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = grpo_loss(logprobs, logprobs.detach(), torch.zeros(2), mask, reference, beta=0.1, loss_type="dapo")
    delta = reference - logprobs.detach()
    k3 = delta.exp() - delta - 1  # pi_ref/pi - log(pi_ref/pi) - 1 >= 0
    assert stats["kl"].item() == pytest.approx((k3 * mask).sum().item() / 3)
    assert loss.item() == pytest.approx(0.1 * (k3 * mask).sum().item() / 3)
    loss.backward()
    assert torch.allclose(logprobs.grad, 0.1 * (1 - delta.exp()) * mask / 3)
    with pytest.raises(TrainingError, match="reference"):
        grpo_loss(logprobs, logprobs.detach(), torch.zeros(2), mask, beta=0.1)


# ----- rollouts -----------------------------------------------------------------------------------------
def build(tmp_path, overrides=(), reward_functions=None):
    """The pieces `grpo()` wires together, for looking inside one step."""
    run = resolve_grpo_run(random_model(), from_tasks=64, tasks=["arithmetic"], difficulty=[1],
                           overrides=[*FAST, *overrides], runs_dir=tmp_path, reward_functions=reward_functions)
    run.train.seq_len = run.options.max_prompt_length + run.options.max_completion_length
    run.train.device = "cpu"  # these tests look inside a CPU step, GPU present or not
    model, tokenizer = load_policy(run.model_dir, run.tokenizer_dir, torch.device("cpu"))
    model.mtp.requires_grad_(False)
    trainer = Trainer(model, run.train, run.run_dir, loss_fn=make_loss_fn(run.options), tokenizer=tokenizer)
    engine = Engine(model, tokenizer, max_model_len=run.train.seq_len, max_num_seqs=64, pack_weights=False)  # as grpo()
    prompts = encode_prompts(tokenizer, run.rows, run.options.max_prompt_length)
    return trainer, Rollouts(run.rows, prompts, engine, trainer, run.reward_functions, run.options)


def test_rollouts_sample_with_the_policy_weights_in_eval_mode_and_hand_back_a_training_model(tmp_path, monkeypatch):
    trainer, rollouts = build(tmp_path, ["lr=3e-2", "rewards=format"],
                              reward_functions=[lambda prompts, completions, completion_ids, **kw: [float(i[0] % 2) for i in completion_ids]])
    model = trainer.model
    modes, heads = [], []
    hook = model.register_forward_pre_hook(lambda module, args: modes.append((module.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled())))
    head = model.lm_head
    head_hook = head.register_forward_hook(lambda module, args, output: heads.append(type(module).__name__))
    batches = rollouts.make_batches()
    assert model.training
    assert model.lm_head is head and heads and set(heads) == {"PackedLinear"}  # packed while sampling, put back after
    head_hook.remove()
    assert (False, True, False) in modes and all(not training for training, inference, _ in modes if inference)

    batch = batches[0]
    rows = batch["completion_mask"].any(dim=1)
    assert rows.all() and batch["targets"][batch["completion_mask"]].numel() == batch["completion_mask"].sum()
    assert torch.equal(batch["loss_mask"], batch["completion_mask"])
    with torch.no_grad():
        logprobs = completion_logprobs(model, batch, temperature=1.0)[0]
    assert torch.allclose(logprobs, batch["engine_logprobs"], atol=1e-5)  # the engine sampled with these weights

    before = copy.deepcopy(model)
    modes.clear()
    metrics = trainer.train_step(iter(batches))  # two micro-batches: one optimizer step
    assert all(training and grad for training, _, grad in modes)
    assert metrics["sampling/logp_diff_mean"] < 1e-5 and metrics["grad_norm"] > 0
    hook.remove()

    batch = rollouts.make_batches()[0]  # sampled after the update: must come from the updated weights
    with torch.no_grad():
        now = completion_logprobs(model, batch, 1.0)[0]
        stale = completion_logprobs(before, batch, 1.0)[0]
    mask = batch["completion_mask"]
    assert (now - batch["engine_logprobs"])[mask].abs().max() < 1e-5
    assert (stale - batch["engine_logprobs"])[mask].abs().max() > 1e-3


def test_rollout_groups_truncation_masking_and_step_normaliser(tmp_path):
    trainer, rollouts = build(tmp_path, ["mask_truncated_completions=true", "max_completion_length=3", "global_batch_size=8",
                                         "micro_batch_size=4", "steps_per_generation=2", "num_iterations=2"])
    batches = rollouts.make_batches()
    assert len(batches) == 2 * 2 * 2  # steps_per_generation x micro-batches per step x num_iterations
    assert batches[:4] == batches[4:] and all("old_logprobs" in b for b in batches)
    assert rollouts.metrics["completions/clipped_ratio"] == 1.0  # a random model never stops within 3 tokens
    assert all(not b["loss_mask"].any() for b in batches)  # ...so masking truncation leaves nothing to train
    assert all(b["num_tokens"] == 0.5 for b in batches)  # max(0 tokens, 1) / 2 micro-batches per step
    metrics = rollouts.metrics
    assert metrics["frac_all_wrong"] == 1.0 and metrics["frac_reward_zero_std"] == 1.0
    assert {"rewards/accuracy_reward/mean", "rewards/format_reward/std", "generation_seconds", "entropy"} - set(metrics) == {"entropy"}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_skipping_zero_advantage_rows_leaves_the_step_gradient_unchanged(tmp_path, loss_type):
    """Rows of groups whose completions all scored the same are not run; the accumulated gradient of
    the step equals that of the whole rollout as one batch."""
    trainer, rollouts = build(tmp_path, [f"loss_type={loss_type}", "micro_batch_size=4"],
                              reward_functions=[lambda prompts, completions, completion_ids, **kw: [float(i[0] < 300) for i in completion_ids]])
    model = trainer.model
    rollout = rollouts.sample(rollouts.sampler.next_batch())
    rewards = torch.tensor([float(ids[0] < 300) for ids in rollout.completion_ids])
    rewards[:4] = 1.0  # make sure one group has zero advantage
    advantages = group_advantages(rewards, torch.tensor(rollout.group_ids))
    batches = rollouts.collate(rollout, advantages)
    assert len(batches) == 4 and 4 <= rollouts.skipped < 16

    def step_gradient(micro_batches, normalised):
        model.zero_grad()
        for batch in micro_batches:
            logprobs = completion_logprobs(model, batch, 1.0)[0]
            extra = {"num_tokens": batch["num_tokens"], "num_sequences": batch["num_sequences"]} if normalised else {}
            loss, _ = grpo_loss(logprobs, logprobs.detach(), batch["advantages"], batch["loss_mask"], loss_type=loss_type,
                                max_completion_length=8, **extra)
            (loss / len(micro_batches)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    skipped = step_gradient(batches, normalised=True)
    whole = step_gradient([rollouts.pad_rows(rollout, range(16), advantages)], normalised=False)
    assert torch.allclose(skipped, whole, atol=1e-7, rtol=1e-4) and whole.abs().max() > 0


def test_packed_rows_give_the_log_probs_entropy_and_gradients_of_the_padded_batch(tmp_path):
    """On CPU in fp32 a micro-batch's rows run as one sequence of documents, each prompt once and each
    completion a document that sees it, without padding: the per-token log-probs, entropies and
    parameter gradients equal those of the padded batch (rows one by one)."""
    trainer, rollouts = build(tmp_path)
    model = trainer.model
    rollout = rollouts.sample(rollouts.sampler.next_batch())
    batch = rollouts.pad_rows(rollout, range(16), torch.linspace(-1, 1, 16))
    assert int(batch["lengths"].sum()) < batch["input_ids"].numel()  # rows of different lengths: padding
    shapes = []
    hook = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))

    def logprobs_and_gradients(batch):
        model.zero_grad(set_to_none=True)
        logprobs, entropy, _ = completion_logprobs(model, batch, 0.7, entropy=True)
        (logprobs * batch["advantages"][:, None]).sum().backward()
        return logprobs.detach(), entropy, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed = logprobs_and_gradients(batch)
    padded = logprobs_and_gradients({key: value for key, value in batch.items() if key != "lengths"})
    hook.remove()
    prompts = {(int(g), int(p)): int(p) for g, p in zip(batch["groups"], batch["prompt_lengths"], strict=True)}
    shared = sum(prompts.values()) + int((batch["lengths"] - batch["prompt_lengths"]).sum())
    rounded = -(-shared // PACKED_MULTIPLE) * PACKED_MULTIPLE  # with a padding document
    assert len(prompts) == 4 and shapes == [(1, rounded), tuple(batch["input_ids"].shape)]  # 4 prompts, 4 completions each
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], padded[1], rtol=1e-5, atol=1e-5)
    assert packed[0][batch["completion_mask"]].abs().min() > 0
    for got, want in zip(packed[2], padded[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_shared_prompt_layout_shares_only_equal_prompts_of_a_group(tmp_path):
    """Rows of one group share their prompt only where its tokens agree; a row of another group with the
    same tokens keeps its own copy; a one-token completion is predicted from the prompt alone. Log-probs
    and gradients equal the padded batch's."""
    trainer, rollouts = build(tmp_path)
    model = trainer.model
    prompts = [[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 9, 8], [5, 6, 7, 8], [11, 12]]
    completions = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29], [30, 31]]
    rollout = Rollout(group_ids=[0, 0, 0, 1, 2], prompt_ids=prompts, completion_ids=completions, texts=[""] * 5,
                      engine_logprobs=[[0.0] * len(c) for c in completions], truncated=[False] * 5)
    batch = rollouts.pad_rows(rollout, range(5), torch.tensor([1.0, -1.0, 0.5, 2.0, -0.5]))
    tokens, positions, documents, completion_index = shared_prompt_layout(batch)
    # prompts of rows 0 (shared by row 1), 2, 3 and 4, and each row's completion but its last token
    assert len(tokens) == 4 + 4 + 4 + 2 + (2 + 0 + 1 + 3 + 1)
    assert tokens.tolist()[:6] == [5, 6, 7, 8, 20, 21] and len(shared_prompt_layout(batch, 16)[0]) == 32
    assert positions.tolist()[:7] == [0, 1, 2, 3, 4, 5, 0]  # row 0's prompt and completion, row 1's (none), row 2's prompt
    assert completion_index.tolist()[:4] == [3, 4, 5, 3]  # row 1's only token is predicted from row 0's prompt
    assert documents.starts is not None and documents.longest == 7

    def logprobs_and_gradients(batch):
        model.zero_grad(set_to_none=True)
        logprobs = completion_logprobs(model, batch, 1.0)[0]
        (logprobs * batch["advantages"][:, None]).sum().backward()
        return logprobs.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed = logprobs_and_gradients(batch)
    padded = logprobs_and_gradients({key: value for key, value in batch.items() if key != "lengths"})
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(packed[1], padded[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_grpo_raises_the_log_probability_of_rewarded_completions(tmp_path):
    """Evidence of learning on a tiny model: reward completions whose first token id is even. After a
    few steps the policy puts more mass on even first tokens (its expected reward), and the rewarded
    completions of the first rollout gained log-probability relative to the unrewarded ones."""
    seen = []

    def even_start(prompts, completions, completion_ids, **columns):
        seen.append((prompts, completion_ids))
        return [float(ids[0] % 2 == 0) for ids in completion_ids]

    run = resolve_grpo_run(random_model(), from_tasks=64, tasks=["arithmetic"], difficulty=[1], runs_dir=tmp_path,
                           overrides=[*FAST, "max_steps=10", "lr=3e-3", "max_completion_length=4"], reward_functions=[even_start])
    grpo(run)
    _, tokenizer = load_policy(run.model_dir, run.tokenizer_dir, torch.device("cpu"))
    initial, final = load_pretrained(run.model_dir), load_pretrained(run.run_dir / "checkpoints" / "step_00000010")
    prompts, completions = seen[0]  # the first rollout, sampled before any update

    def first_token_logprobs(model, prompt, completion_ids):
        """(log-probs of the completion's tokens summed, P(first token is even))."""
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0, len(prompt_ids) - 1 : -1]
        logprobs = logits.float().log_softmax(-1)
        chosen = logprobs.gather(1, torch.tensor(completion_ids)[:, None]).sum().item()
        return chosen, logprobs[0, ::2].exp().sum().item()

    change = {}
    for rewarded in (True, False):
        pairs = [(p, c) for p, c in zip(prompts, completions, strict=True) if (c[0] % 2 == 0) == rewarded]
        before = [first_token_logprobs(initial, p, c)[0] for p, c in pairs]
        after = [first_token_logprobs(final, p, c)[0] for p, c in pairs]
        change[rewarded] = (sum(after) - sum(before)) / len(pairs)
    assert change[True] > 1.0 and change[True] - change[False] > 1.0, change
    expected = [[first_token_logprobs(model, p, c)[1] for p, c in zip(prompts, completions, strict=True)] for model in (initial, final)]
    assert sum(expected[1]) / len(prompts) > sum(expected[0]) / len(prompts) + 0.01, expected


def test_a_reference_model_exists_only_when_beta_is_positive(tmp_path, monkeypatch):
    copies, deepcopy = [], copy.deepcopy
    def counting_deepcopy(value, memo=None):
        if isinstance(value, CausalLM):
            copies.append(value)
        return deepcopy(value, memo)

    monkeypatch.setattr("nanoseek.train.grpo.copy.deepcopy", counting_deepcopy)
    for beta in (0.0, 0.04):
        metrics = grpo(resolve_grpo_run(random_model(), from_tasks=64, tasks=["arithmetic"], difficulty=[1], runs_dir=tmp_path,
                                        name=f"beta{beta}", overrides=[*FAST, "max_steps=1", f"beta={beta}"]))
        assert ("kl" in metrics) == (beta > 0)
    assert len(copies) == 1


# ----- resume and bad input -------------------------------------------------------------------------------
def test_resume_continues_from_the_checkpoint(tmp_path):
    arguments = dict(from_tasks=64, tasks=["arithmetic"], difficulty=[1], runs_dir=tmp_path)
    grpo(resolve_grpo_run(random_model(), overrides=[*FAST, "max_steps=2", "checkpoint_every=1"], **arguments))
    with pytest.raises(TrainingError, match="already holds a run"):
        resolve_grpo_run(random_model(), overrides=[*FAST, "max_steps=3"], **arguments)
    metrics = grpo(resolve_grpo_run(random_model(), overrides=[*FAST, "max_steps=3"], resume=True, **arguments))
    assert metrics["step"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_prompts_are_checked_against_the_limits(tmp_path):
    with pytest.raises(ConfigError, match=r"64 prompts are longer than max_prompt_length=4: row 0 \(\d+ tokens\)"):
        grpo(resolve_grpo_run(random_model(), from_tasks=64, tasks=["arithmetic"], difficulty=[1], runs_dir=tmp_path,
                              overrides=[*FAST, "max_prompt_length=4"]))
    with pytest.raises(ConfigError, match="exceed the model's context"):
        grpo(resolve_grpo_run(random_model(), from_tasks=64, tasks=["arithmetic"], difficulty=[1], runs_dir=tmp_path,
                              overrides=[*FAST, "max_completion_length=5000"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_generations=1"], "num_generations must be >= 2"),
        (["global_batch_size=10", "micro_batch_size=5"], "is not a multiple of num_generations=4"),
        (["loss_type=ppo"], "loss_type 'ppo' is not one of grpo, dr_grpo, dapo"),
        (["reward_weights=[1.0]"], "1 reward_weights for 2 rewards"),
        (["rewards=nanoseek.train.rewards:missing"], "cannot load reward"),
    ],
)
def test_cli_bad_settings_fail_with_one_line(tmp_path, capsys, overrides, message):
    code = main(["grpo", "--model", str(random_model()), "--from-tasks", "64", "--tasks", "arithmetic", "--difficulty", "1",
                 "--runs-dir", str(tmp_path), *FAST, "max_steps=1", *overrides])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and error.startswith("nanoseek grpo: error:") and message in error


def test_missing_columns_and_failing_rewards_are_named(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Say {i}.", "solution": str(i)}) for i in range(16)) + "\n")
    code = main(["grpo", "--model", str(random_model()), "--data", str(prompts), "--runs-dir", str(tmp_path), *FAST])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error
    assert error.endswith("reward 'accuracy_reward' needs column(s) answer (the dataset has: solution)")

    def failing_reward(prompts, completions, **columns):
        return [float(columns["answer"] == completion) for completion in completions]

    run = resolve_grpo_run(random_model(), data=prompts, runs_dir=tmp_path, overrides=FAST, reward_functions=[failing_reward])
    with pytest.raises(TrainingError, match="reward function 'failing_reward' raised KeyError: 'answer'"):
        grpo(run)


def test_config_validation():
    with pytest.raises(ConfigError, match="temperature must be > 0.*scale_rewards 'std'"):
        GRPOConfig(temperature=0, scale_rewards="std")
