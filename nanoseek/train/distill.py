"""`nanoseek distill`: teach a student (smaller, possibly dense) what a teacher model knows.

    nanoseek distill --teacher runs/r1/rl/checkpoints/step_00000200 --student qwen2-nano \\
        --from-tasks 2000 --name distill divergence=jsd beta=0.5 max_steps=300
    nanoseek distill --teacher DIR --student qwen2-nano --from-tasks 512 --name distill-seq \\
        mode=sequence sample.samples_per_prompt=8

mode=sequence (DeepSeek-R1-Distill, R1 paper §2.4): the teacher answers the prompts (GRPO's: `--data`
    prompts with answers, or `--from-tasks`), rejection sampling keeps its verified answers (`nanoseek
    rejection-sample`) and the student is fine-tuned on them (`nanoseek sft`). It works on text, so
    the student may have a tokenizer of its own.
mode=logit (Hinton et al. 2015; GKD, Agarwal et al. 2024): the student learns the teacher's whole
    next-token distribution at every reply token of the chats (`--data` / `--from-tasks`, as for SFT)
    or, for a share `on_policy_fraction` (GKD's lambda) of the micro-batches, of its own sampled
    replies to their prompts (on-policy: it is corrected where it actually goes). With
    p_T = softmax(z_T / tau) and p_S = softmax(z_S / tau) at a position:

        forward_kl  KL(p_T || p_S)                    mean-seeking: the classic KD loss
        reverse_kl  KL(p_S || p_T)                    mode-seeking (MiniLLM, Gu et al. 2024)
        jsd         beta KL(p_T || m) + (1 - beta) KL(p_S || m),   m = beta p_T + (1 - beta) p_S
                    (GKD eq. 1; JSD / beta -> forward KL as beta -> 0 and JSD / (1 - beta) -> reverse
                    KL as beta -> 1; as in TRL, beta = 0 and 1 are computed as exactly those KLs)

    averaged over reply tokens, with no tau^2 factor (as TRL's GKD). The teacher runs frozen under
    no_grad. Teacher and student may differ in architecture (a DeepSeek MoE teacher, a dense Qwen2
    student) but must share the tokenizer (the same ids for the same text): checked before training.

--student is a checkpoint directory or a preset: a random student with the teacher's vocabulary and
tokenizer (`model.key=value` overrides), written once to RUN/student_init. `key=value` settings go to
TrainConfig, SFTConfig and DistillConfig, `sample.key=value` to the RejectionConfig of mode=sequence.
Outputs are SFT's: runs/<name>/metrics.jsonl (mode=logit: loss = the divergence, forward_kl,
reverse_kl, the student's and the teacher's lm_loss on the replies, val_* and held-out accuracy) and
checkpoints/step_* of the student.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.checkpoint import load_pretrained
from nanoseek.config import PRESETS, load_model_config, parse_overrides
from nanoseek.data.loader import IGNORE_INDEX, EpochSampler, SFTLoader
from nanoseek.data.tasks import DIFFICULTIES, TASKS
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.io import atomic_directory
from nanoseek.model import CausalLM, build_model
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import parallel
from nanoseek.train.rejection import RejectionConfig, prompt_rows, rejection_sample, settings_listing
from nanoseek.train.sft import (
    SFT_TRAIN_DEFAULTS,
    SFTConfig,
    SFTRun,
    check_context,
    check_model_dir,
    evaluation_due,
    heldout_evaluator,
    load_policy,
    resolve_sft_run,
    resume_point,
    settings_help,
    sft,
    split_overrides,
    write_run_config,
)
from nanoseek.train.trainer import Batch, LossFn, Trainer, output_metrics

MODES = ("logit", "sequence")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
MODEL_PREFIX, SAMPLE_PREFIX = "model.", "sample."
STUDENT_INIT, TEACHER_SAMPLES = "student_init", "teacher_samples.jsonl"


@dataclass
class DistillConfig:
    """What distillation adds to SFT's settings. CLI: `key=value`."""

    mode: str = "logit"  # "logit" (token distributions) or "sequence" (SFT on verified teacher samples)
    divergence: str = "forward_kl"  # "forward_kl", "reverse_kl" or "jsd"
    beta: float = 0.5  # jsd's interpolation: 0 = forward KL, 1 = reverse KL
    temperature: float = 1.0  # tau: both models' logits are divided by it
    on_policy_fraction: float = 0.0  # GKD's lambda: share of micro-batches replied to by the student itself
    on_policy_max_tokens: int = 128  # length of the student's on-policy replies
    on_policy_temperature: float = 1.0  # the student's sampling temperature for them

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.divergence not in DIVERGENCES:
            problems.append(f"divergence {self.divergence!r} is not one of {', '.join(DIVERGENCES)}")
        if not 0 <= self.beta <= 1:
            problems.append(f"beta must be in [0, 1], got {self.beta}")
        if self.temperature <= 0 or self.on_policy_temperature <= 0:
            problems.append("temperature and on_policy_temperature must be > 0")
        if not 0 <= self.on_policy_fraction <= 1:
            problems.append(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.on_policy_max_tokens < 1:
            problems.append(f"on_policy_max_tokens must be >= 1, got {self.on_policy_max_tokens}")
        if problems:
            raise ConfigError("invalid distillation config: " + "; ".join(problems))


# ----- divergences ---------------------------------------------------------------------------------------
def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / tau) over the last dimension, in fp32 (or fp64 for fp64 logits)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """The divergence `kind` between the student's and the teacher's next-token distributions at each
    position, [...] from log-probabilities [..., vocab] (formulas in the module docstring)."""
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):
        return kl_divergence(teacher, student)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl_divergence(student, teacher)
    if kind != "jsd":
        raise ConfigError(f"divergence {kind!r} is not one of {', '.join(DIVERGENCES)}")
    mixture = torch.logsumexp(torch.stack((teacher + math.log(beta), student + math.log1p(-beta))), dim=0)
    return beta * kl_divergence(teacher, mixture) + (1 - beta) * kl_divergence(student, mixture)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) over the last dimension, from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def make_loss_fn(teacher: nn.Module, config: DistillConfig, vocab_size: int) -> LossFn:
    """The Trainer's loss: the mean divergence over reply tokens (targets != IGNORE_INDEX). Logits are
    compared over the first `vocab_size` ids (the shared tokenizer's, when the models pad differently).
    Also logs both KLs, the student's and the teacher's cross-entropy on the replies, and the share of
    on-policy micro-batches."""

    def distillation_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs, targets = batch["input_ids"], batch["targets"]
        where = dict(positions=batch.get("position_ids"), document_ids=batch.get("segment_ids"))
        replies = targets != IGNORE_INDEX
        with torch.no_grad():
            teacher_logits = teacher(inputs, use_mtp=False, **where).logits[replies][:, :vocab_size]
        output = model(inputs, use_mtp=False, **where)
        student_logits = output.logits[replies][:, :vocab_size]
        student, teacher_ = log_probs(student_logits, config.temperature), log_probs(teacher_logits, config.temperature)
        loss = divergence(student, teacher_, config.divergence, config.beta).mean()
        with torch.no_grad():
            labels = targets[replies]
            metrics = {
                "forward_kl": kl_divergence(teacher_, student).mean(),
                "reverse_kl": kl_divergence(student, teacher_).mean(),
                "student_lm_loss": F.cross_entropy(student_logits.float(), labels),
                "teacher_lm_loss": F.cross_entropy(teacher_logits.float(), labels),
                "on_policy": batch.get("on_policy", torch.tensor(0.0)).float(),
            }
        return loss, {**metrics, **output_metrics(output)}

    return distillation_loss


# ----- on-policy batches (GKD) ----------------------------------------------------------------------------
class OnPolicyBatches:
    """GKD's data mix as the Trainer's batch source: each micro-batch is, with probability
    `fraction` (lambda), the student's own replies to the next prompts, sampled through `engine` (which
    shares the student's weights, so it samples from the model being trained); otherwise the next
    `dataset` batch. The coin of draw i is a pure function of (seed, i), so resuming replays it.

    Student batches: input_ids [b, S] (prompt + reply, right-padded), targets [b, S] (the next token
    where it is a reply token, else IGNORE_INDEX), on_policy [] = 1. A prompt and its reply fit the
    engine's context, so prompts must be shorter than it.
    """

    def __init__(
        self, dataset: SFTLoader, prompts: Sequence[list[int]], engine: Engine, config: DistillConfig,
        seed: int, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.dataset, self.prompts, self.engine, self.config = dataset, list(prompts), engine, config
        self.seed, self.autocast, self.draws = seed, autocast, 0
        self.sampler = EpochSampler(len(self.prompts), dataset.sampler.batch_size, seed)

    def __iter__(self) -> OnPolicyBatches:
        return self

    def __next__(self) -> Batch:
        self.draws += 1
        if random.Random(f"{self.seed}/{self.draws}").random() >= self.config.on_policy_fraction:
            return {**next(self.dataset), "on_policy": torch.tensor(0.0)}
        indices = self.sampler.next_batch()
        prompts = [self.prompts[i] for i in indices]
        base_seed = (self.seed * 1_000_003 + self.draws) * len(prompts)
        params = [
            SamplingParams(temperature=self.config.on_policy_temperature, seed=(base_seed + position) % 2**63,
                           max_tokens=min(self.config.on_policy_max_tokens, self.engine.max_model_len - len(prompt)))
            for position, prompt in enumerate(prompts)
        ]
        model = self.engine.model
        was_training = model.training
        model.eval()  # sampling never runs training-only paths (the MoE balance statistics)
        with self.autocast():
            outputs = self.engine.generate(prompts, params)
        model.train(was_training)
        rows = [prompt + output.outputs[0].token_ids for prompt, output in zip(prompts, outputs, strict=True)]
        width = max(map(len, rows)) - 1
        inputs = torch.full((len(rows), width), self.dataset.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for row_index, (prompt, row) in enumerate(zip(prompts, rows, strict=True)):
            ids = torch.tensor(row)
            inputs[row_index, : len(row) - 1] = ids[:-1]
            targets[row_index, len(prompt) - 1 : len(row) - 1] = ids[len(prompt):]
        return {"input_ids": inputs, "targets": targets, "on_policy": torch.tensor(1.0)}

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state_dict(), "prompts": self.sampler.state_dict(), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.sampler.load_state_dict(state["prompts"])
        self.draws = state["draws"]


# ----- teacher and student ----------------------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A hash of what decides the ids of a text: normalizer, pre-tokenizer, BPE vocabulary and merges,
    added tokens."""
    state = json.loads(tokenizer.backend.to_str())
    parts = {key: state.get(key) for key in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def check_same_tokenizer(teacher: Tokenizer, student: Tokenizer) -> None:
    """ConfigError unless both tokenizers give the same ids for the same text."""
    if teacher.vocab_size != student.vocab_size:
        reason = f"the teacher's tokenizer has {teacher.vocab_size} tokens, the student's {student.vocab_size}"
    elif tokenizer_fingerprint(teacher) != tokenizer_fingerprint(student):
        reason = f"both tokenizers have {teacher.vocab_size} tokens but split text into different ids"
    else:
        return
    raise ConfigError(
        f"teacher and student tokenizers differ ({reason}): logit distillation compares the two models' "
        "distributions token by token, so they must share a tokenizer. Give the student the teacher's "
        "tokenizer (a preset --student gets it) or use mode=sequence, which distills through text"
    )


def init_student(
    student: str, teacher_dir: Path, overrides: Sequence[str], directory: Path, seed: int, reuse: bool = False
) -> Path:
    """The student's starting checkpoint: `student` itself if it is a directory; for a preset, a random
    model with the teacher's vocabulary size (unless overridden) and the teacher's tokenizer, written
    to `directory` (`reuse`: kept if already there, as a resumed run needs)."""
    if student not in PRESETS:
        if overrides:
            raise ConfigError(f"model.* settings apply to a preset student, not to the checkpoint {student}")
        return check_model_dir(student)[0]
    if not (reuse and (directory / "config.json").is_file()):
        teacher_vocab = load_model_config(teacher_dir).vocab_size
        config = load_model_config(student, list(overrides))
        if not any(item.split("=")[0].strip() == "vocab_size" for item in overrides):
            config = config.replace(vocab_size=teacher_vocab)
        with atomic_directory(directory) as staging:
            build_model(config, seed=seed).save_pretrained(staging)
            Tokenizer.from_pretrained(teacher_dir).save_pretrained(staging)
    return directory


def prompt_ids(tokenizer: Tokenizer, chat: Sequence[dict]) -> list[int]:
    """A chat up to its last assistant reply, rendered with a generation prompt: what the student
    replies to on-policy."""
    last_reply = max(i for i, message in enumerate(chat) if message["role"] == "assistant")
    return tokenizer.apply_chat_template(chat[:last_reply], add_generation_prompt=True, tokenize=True)


def load_teacher(teacher_dir: Path, device: torch.device) -> CausalLM:
    """The teacher frozen in eval mode: bf16 on GPUs (it only runs forwards), fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_pretrained(teacher_dir, dtype=dtype, device=device, load_mtp=False).eval().requires_grad_(False)


# ----- the stage --------------------------------------------------------------------------------------------
def distill(
    teacher: str | Path,
    student: str,
    data: str | Path | None = None,
    from_tasks: int = 0,
    tasks: Sequence[str] = TASKS,
    difficulty: Sequence[int] = (1, 2),
    overrides: Sequence[str] = (),
    name: str = "distill",
    runs_dir: str | Path = "runs",
    resume: str | bool | None = None,
) -> dict[str, Any]:
    """Distill `teacher` (a checkpoint directory) into `student` (a preset or a checkpoint directory);
    returns the student run's last metrics. Every setting is checked before any sampling or training."""
    options, sampling, model_overrides, sft_overrides = parse_settings(overrides)
    teacher_dir = check_model_dir(teacher)[0]
    train, _ = split_overrides(sft_overrides, SFTConfig, SFT_TRAIN_DEFAULTS)
    run_dir = Path(runs_dir) / name
    resume_point(run_dir, resume)
    rows = prompt_rows(data, from_tasks, tasks, difficulty, train.seed) if options.mode == "sequence" else None
    student_dir = init_student(student, teacher_dir, model_overrides, run_dir / STUDENT_INIT, train.seed, bool(resume))

    if rows is not None:
        samples = run_dir / TEACHER_SAMPLES
        if not (resume and samples.is_file()):
            stats = rejection_sample(teacher_dir, rows, sampling, samples)
            print(json.dumps({"teacher_samples": str(samples), **stats.to_dict()}), file=sys.stderr)
        run = resolve_sft_run(student_dir, samples, 0, tasks, difficulty, sft_overrides, name, runs_dir, resume)
        return sft(run)

    check_same_tokenizer(Tokenizer.from_pretrained(teacher_dir), Tokenizer.from_pretrained(student_dir))
    run = resolve_sft_run(student_dir, data, from_tasks, tasks, difficulty, sft_overrides, name, runs_dir, resume)
    return distill_logits(run, teacher_dir, options)


def distill_logits(run: SFTRun, teacher_dir: Path, options: DistillConfig) -> dict[str, Any]:
    """Train `run`'s student to match the teacher's token distributions; returns the last metrics."""
    topology = parallel.init_distributed(run.train.device)
    try:
        config = run.train
        config.grad_accum_steps(topology.world_size)
        if options.on_policy_fraction > 0 and topology.is_distributed:
            raise TrainingError("on-policy distillation runs in one process (the engine samples with whole weights): drop torchrun")
        model, tokenizer = load_policy(run.model_dir, run.tokenizer_dir, topology.device)
        check_context(model, config.seq_len)
        teacher = load_teacher(teacher_dir, topology.device)
        vocab_size = min(model.config.vocab_size, teacher.config.vocab_size)
        loader = functools.partial(
            SFTLoader, tokenizer=tokenizer, batch_size=config.micro_batch_size, max_length=config.seq_len,
            seed=config.seed, packing=run.options.packing, rank=topology.rank, world_size=topology.world_size,
        )
        trainer = Trainer(model, config, run.run_dir, topology=topology, loss_fn=make_loss_fn(teacher, options, vocab_size),
                          tokenizer=tokenizer)
        batches: Any = loader(run.conversations, shuffle=True)
        if options.on_policy_fraction > 0:
            context = min(config.seq_len + 1, model.config.max_position_embeddings)  # a row and its shifted target
            prompts = [ids for ids in (prompt_ids(tokenizer, chat) for chat in run.conversations) if len(ids) < context]
            if not prompts:
                raise ConfigError(f"no prompt is shorter than seq_len={config.seq_len} tokens: the student has no room to reply")
            engine = Engine(trainer.model, tokenizer, max_num_seqs=config.micro_batch_size, max_model_len=context,
                            pack_weights=False)
            model.train()
            batches = OnPolicyBatches(batches, prompts, engine, options, config.seed, trainer.precision.autocast)
        val_batches = functools.partial(loader, run.val_conversations, shuffle=False) if run.val_conversations else None
        if run.resume_from is not None:
            trainer.load_checkpoint(run.resume_from, batches)
        if topology.is_main:
            write_run_config(run.run_dir, {
                "stage": "distill", "teacher": str(teacher_dir), "student": str(run.model_dir),
                "train": dataclasses.asdict(config), "sft": dataclasses.asdict(run.options),
                "distill": dataclasses.asdict(options), "chats": len(run.conversations),
            })
        evaluate = heldout_evaluator(trainer, tokenizer, run.eval_problems, run.options.eval_max_tokens)

        def on_step(metrics: dict[str, Any]) -> bool:
            if evaluate is not None and evaluation_due(trainer):
                metrics.update(evaluate())
            return False

        metrics = trainer.fit(batches, val_batches, on_step=on_step)
        if topology.is_main:
            keys = ("step", "loss", "forward_kl", "reverse_kl", "val_loss", "val_accuracy")
            print(json.dumps({"run": str(run.run_dir), **{k: metrics[k] for k in keys if k in metrics},
                              "checkpoint": str(trainer.last_checkpoint)}))
        return metrics
    finally:
        parallel.shutdown()


def parse_settings(overrides: Sequence[str]) -> tuple[DistillConfig, RejectionConfig, list[str], list[str]]:
    """`key=value` strings -> (DistillConfig, RejectionConfig from `sample.*`, the `model.*` student
    overrides, the rest for SFT's TrainConfig / SFTConfig)."""
    model_items = [item[len(MODEL_PREFIX):] for item in overrides if item.startswith(MODEL_PREFIX)]
    sample_items = [item[len(SAMPLE_PREFIX):] for item in overrides if item.startswith(SAMPLE_PREFIX)]
    rest = [item for item in overrides if not item.startswith((MODEL_PREFIX, SAMPLE_PREFIX))]
    distill_fields = {field.name for field in dataclasses.fields(DistillConfig)}
    mine = [item for item in rest if item.partition("=")[0].strip().replace("-", "_") in distill_fields]
    options = DistillConfig(**parse_overrides(DistillConfig, mine))
    sampling = RejectionConfig(**parse_overrides(RejectionConfig, sample_items))
    return options, sampling, model_items, [item for item in rest if item not in mine]


# ----- command line -------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"DistillConfig: {settings_listing(DistillConfig)}. {settings_help(SFTConfig, SFT_TRAIN_DEFAULTS)} "
        f"mode=sequence, sample.*: RejectionConfig: {settings_listing(RejectionConfig)}. "
        "model.*: ModelConfig fields of a preset --student."
    )
    parser.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's checkpoint directory")
    parser.add_argument("--student", required=True, metavar="PRESET|DIR", help="a preset (random init) or a checkpoint directory")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help='mode=logit: JSONL of {"messages": [...]} chats; mode=sequence: prompts as for GRPO')
    parser.add_argument("--from-tasks", type=int, default=0, metavar="N", help="use N generated problems of the built-in tasks")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks for --from-tasks and held-out accuracy")
    parser.add_argument("--difficulty", nargs="+", type=int, default=[1, 2], choices=DIFFICULTIES)
    parser.add_argument("--name", default="distill", help="run name: outputs go to RUNS_DIR/NAME")
    parser.add_argument("--runs-dir", default="runs", metavar="DIR")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue the run from its latest checkpoint (or from CHECKPOINT)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="DistillConfig / TrainConfig / SFTConfig settings, sample.* (mode=sequence), model.* (preset student)")


def cli_main(args: argparse.Namespace) -> int:
    distill(args.teacher, args.student, args.data, args.from_tasks, args.tasks, args.difficulty, args.overrides,
            args.name, args.runs_dir, args.resume)
    return 0
