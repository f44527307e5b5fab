"""Decoding speed: the nanoseek engine against transformers `generate` on the same weights, in one run.

Configs: preset `small` (= ../shared/bench/small.json, DeepSeek-V3-shaped MoE with MLA) and
`qwen2-small` (dense, grouped-query attention), random weights. 64-token prompt, 128 new tokens,
greedy (EOS ignored). One JSON line per row: {"bench", "ours", "baseline", "ratio", "unit", "config",
"threads", "notes"}. Ours and the baseline run alternately and the medians are reported: wall-clock
rates in "ours"/"baseline", and on shared machines also the rates per second of process CPU time in
"notes" (`ours_cpu`, `baseline_cpu`: what each side achieves while it actually runs). Our engines
run without prefix caching: the same prompts repeat across runs, and these rows measure decoding
(`benchmarks/prefix_cache.py` measures the reuse).

Rows (per config):
  decode_b1_fp32        batch-1 tokens/s, fp32 both sides; identical tokens asserted
  roofline_b1_fp32      ours against the memory-bandwidth bound: (bytes of weights a decoded token
                        reads) / (read bandwidth: sum over a 256 MiB tensor, probed between the
                        alternating decoding runs, median: it drifts from ~50 to ~80 GB/s on a shared
                        host); ratio = fraction reached
  matmul_floor_b1_fp32  a decode step of ours against the same step's matrix products replayed alone
                        (recorded at the dispatcher: the same kernels on the same packed weights, in
                        order); ratio = the share of the step spent in them, the bound on what removing
                        everything else (norms, RoPE, cache, attention, sampling, Python) could buy
  decode_b1_bf16        our bf16 weights (oneDNN-packed by the engine) against transformers' fp32
                        (notes: roofline fraction)
  decode_b1_int8        our int8 weight-only (bf16 activations) against transformers' fp32
  decode_b16            16 concurrent requests through continuous batching (aggregate tokens/s)
                        against transformers' batched generate; identical tokens asserted
  decode_b16_bf16       the same with our bf16 weights against transformers' fp32 (16 rows make the
                        step GEMM-bound, and AVX512-bf16 doubles the multiply rate; notes: agreement)
  kv_bytes_per_token    our cache (latent + rope key for MLA, grouped KV heads for GQA) against a
                        naive multi-head cache of the same model, bf16; must equal the formula
And once:
  mtp_speculative_b1    MTP self-speculative decoding against plain decoding (ours, batch 1, greedy)
                        on nano models whose MTP layer was trained here on generated task text
                        (cached in runs/bench-mtp-nano-L*): the 4-layer preset, and a 12-layer one in
                        which the MTP block is a more realistic share of the model (V3: 1 of 62
                        blocks; nano: 1 of 5); both stay in a 32 MB cache, where a step costs by rows,
                        so `--mtp-layers 48 --mtp-seconds 2100` adds a 73 MB one whose steps read
                        weights from memory, as V3's do (35 minutes of training the first time), with 1, 2 and 3 drafts per step (--mtp-drafts; beyond
                        the first the depth drafts from its own output, as vLLM does with V3's single
                        MTP layer); notes: acceptance rate (the share of drafts accepted), mean
                        accepted length (tokens emitted per verify forward)

    python benchmarks/decode.py [--configs small qwen2-small] [--rows ...] [--threads N] [--repeats 3] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

from nanoseek import ModelConfig
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.quant import quantize_model
from nanoseek.model import build_model, cpu_ops
from nanoseek.model.cache import cache_bytes_per_token
from nanoseek.model.decode_layer import enable_fused_decode
from nanoseek.model.moe import RoutedExperts

PROMPT_TOKENS, NEW_TOKENS, CONCURRENT = 64, 128, 16
MTP_DIR = Path("runs")
DEVICE = torch.device("cpu")  # --device; both sides run there


def emit(bench: str, ours: float, baseline: float | None, unit: str, config: str, **notes) -> None:
    ratio = None if not baseline else round(ours / baseline, 3)
    row = {"bench": bench, "ours": round(ours, 3), "baseline": None if baseline is None else round(baseline, 3),
           "ratio": ratio, "unit": unit, "config": config, "threads": torch.get_num_threads(), "device": str(DEVICE), "notes": notes}
    print(json.dumps(row), flush=True)


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def alternate(functions: list, repeats: int) -> list[tuple[float, float, object]]:
    """(median wall seconds, median CPU seconds, last result) of each function, run alternately after a warm-up."""
    results = [function() for function in functions]
    wall: list[list[float]] = [[] for _ in functions]
    cpu: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for index, function in enumerate(functions):
            synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            results[index] = function()
            synchronize()
            wall[index].append(time.perf_counter() - start)
            cpu[index].append(time.process_time() - start_cpu)
    return [(statistics.median(w), statistics.median(c), r) for w, c, r in zip(wall, cpu, results, strict=True)]


def read_bandwidth(repeats: int = 7) -> tuple[float, float]:
    """Bytes/s of a sum over a 256 MiB fp32 tensor (on a GPU: 4 GiB): (per wall second, per CPU second), medians."""
    data = torch.ones((16 if DEVICE.type == "cuda" else 1) * 256 * 2**20 // 4, device=DEVICE)
    data.sum()
    wall, cpu = [], []
    for _ in range(repeats):
        synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        data.sum()
        synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    size = data.numel() * 4
    return size / statistics.median(wall), size / statistics.median(cpu) * torch.get_num_threads()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoded token reads at batch 1: every matrix of the main model once, only
    the chosen top-k routed experts of each MoE layer, one embedding row; MTP depths are not run."""
    config, total = model.config, 0
    for name, module in model.named_modules():
        if name.startswith("mtp"):
            continue
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        size = sum(t.numel() * t.element_size() for t in tensors)
        if isinstance(module, RoutedExperts):
            size = size * config.num_experts_per_tok // config.n_routed_experts
        elif module is model.model.embed_tokens:
            size = size // config.vocab_size  # a tied head counts the matrix in full as lm_head
        elif module is model.model.rotary_emb:
            size = 0
        total += size
    return total


MATRIX_PRODUCTS = {
    torch.ops.mkldnn._linear_pointwise.default, torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default, torch.ops.aten._weight_int8pack_mm.default,
}


KERNEL_PRODUCTS = ("panel_linear", "rows_linear")  # cpu_ops' matrix products (called directly, not dispatched)


class MatrixProductRecorder(TorchDispatchMode):
    """Keeps (op, args, kwargs) of every matrix product dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATRIX_PRODUCTS:
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **kwargs or {})


def matmul_floor(engine: Engine, prompt: list[int], repeats: int) -> tuple[float, float, int]:
    """(median seconds of a batch-1 decode step, median seconds of that step's matrix products replayed
    alone, how many there are). The products of the first decode step are recorded, then replayed in
    order; every weight is read from memory again, as in a step (they do not fit in the caches).
    Decoding and replaying alternate for `repeats` rounds (the load of a shared machine drifts).
    The recorded step runs the layers' modules rather than their one-call C++ step (the same products
    in the same order), so that the kernels' products (`cpu_ops.panel_linear`, `rows_linear`), which
    the C++ step calls directly, are seen too. The routed-experts kernel is not a product recorded here."""
    recorder, steps, replays = MatrixProductRecorder(), [], []
    kernels = cpu_ops.load()
    for round_ in range(max(repeats, 1)):
        handle = engine.submit(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
        engine.step()  # the prefill
        if round_ == 0:
            originals = {name: getattr(kernels, name) for name in KERNEL_PRODUCTS} if kernels is not None else {}
            for name, kernel in originals.items():
                setattr(kernels, name, lambda *args, kernel=kernel: recorder.calls.append((kernel, args, {})) or kernel(*args))
            enable_fused_decode(engine.model, False)
            try:
                with recorder:
                    engine.step()
            finally:
                enable_fused_decode(engine.model, True)
                for name, kernel in originals.items():
                    setattr(kernels, name, kernel)
        while not handle.finished:
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        with torch.inference_mode():
            for _ in range(20):
                start = time.perf_counter()
                for func, args, kwargs in recorder.calls:
                    func(*args, **kwargs)
                replays.append(time.perf_counter() - start)
    return statistics.median(steps), statistics.median(replays), len(recorder.calls)


def random_prompts(config: ModelConfig, count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(2, config.vocab_size, (count, PROMPT_TOKENS), generator=generator).tolist()


def bench_config(name: str, rows: set[str], repeats: int) -> bool:
    """All rows of one config; returns False if tokens differed where they must be identical."""
    config = ModelConfig.from_preset(name)
    model = build_model(config, seed=0).eval()
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval().to(DEVICE)
    model.to(DEVICE)
    prompts = random_prompts(config, CONCURRENT)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ok = True

    @torch.inference_mode()
    def theirs(batch: list[list[int]]):
        ids = torch.tensor(batch, device=DEVICE)
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        return out[:, PROMPT_TOKENS:].tolist()

    def ours(engine: Engine, batch: list[list[int]]):
        return [o.outputs[0].token_ids for o in engine.generate(batch, greedy)]

    weight_bytes = weight_bytes_per_token(model)  # before the engine packs the weights (same bytes, opaque tensors)
    engine = Engine(model, max_num_seqs=CONCURRENT, prefix_caching=False)  # decode speed, not prompt reuse
    if "matmul_floor_b1_fp32" in rows and DEVICE.type == "cpu":  # replays CPU kernels
        step, products, count = matmul_floor(engine, prompts[0], repeats)
        emit("matmul_floor_b1_fp32", 1 / step, 1 / products, "steps/s", name, matrix_products_per_step=count,
             step_ms=round(step * 1e3, 3), products_ms=round(products * 1e3, 3),
             products_roofline_fraction=round(weight_bytes / products / read_bandwidth()[0], 3))
    if rows & {"decode_b1_fp32", "roofline_b1_fp32", "decode_b1_bf16", "decode_b1_int8"}:
        one = prompts[:1]
        bandwidths: list[tuple[float, float]] = []  # probed between the decoding runs: the host's bandwidth drifts

        def probe() -> None:
            bandwidths.append(read_bandwidth(5))

        (our_time, our_cpu, our_tokens), (their_time, their_cpu, their_tokens), _ = alternate(
            [lambda: ours(engine, one), lambda: theirs(one), probe], repeats)
        identical = our_tokens == their_tokens
        ok &= identical
        if "decode_b1_fp32" in rows:
            emit("decode_b1_fp32", NEW_TOKENS / our_time, NEW_TOKENS / their_time, "tok/s", name, identical=identical,
                 target_ratio=2.0, ours_cpu=round(NEW_TOKENS / our_cpu, 2), baseline_cpu=round(NEW_TOKENS / their_cpu, 2))
        if "roofline_b1_fp32" in rows:
            bandwidth, bandwidth_cpu = (statistics.median(b[i] for b in bandwidths) for i in range(2))
            emit("roofline_b1_fp32", NEW_TOKENS / our_time, bandwidth / weight_bytes, "tok/s", name,
                 weight_bytes_per_token=weight_bytes, read_bandwidth_gbps=round(bandwidth / 1e9, 2), target_ratio=0.8,
                 fraction_cpu_time=round(NEW_TOKENS / our_cpu / (bandwidth_cpu / weight_bytes), 3),
                 transformers_fraction=round(NEW_TOKENS / their_time / (bandwidth / weight_bytes), 3))
        for row, scheme in (("decode_b1_bf16", "bf16"), ("decode_b1_int8", "int8")):
            if row not in rows:
                continue
            variant = build_model(config, seed=0, dtype=torch.bfloat16).eval() if scheme == "bf16" else (
                quantize_model(build_model(config, seed=0).eval(), "int8"))
            variant.to(DEVICE)
            variant_bytes = weight_bytes_per_token(variant)  # before the engine packs bf16 weights (same bytes)
            variant_engine = Engine(variant, max_num_seqs=CONCURRENT, prefix_caching=False)
            bandwidths.clear()
            (variant_time, variant_cpu, variant_tokens), (their_time, their_cpu, _), _ = alternate(
                [lambda e=variant_engine: ours(e, one), lambda: theirs(one), probe], repeats)
            agreement = sum(a == b for a, b in zip(variant_tokens[0], our_tokens[0], strict=True)) / NEW_TOKENS
            emit(row, NEW_TOKENS / variant_time, NEW_TOKENS / their_time, "tok/s", name,
                 target_ratio=3.5 if scheme == "bf16" else 5.0, token_agreement_with_fp32=round(agreement, 3),
                 ours_cpu=round(NEW_TOKENS / variant_cpu, 2), baseline_cpu=round(NEW_TOKENS / their_cpu, 2),
                 weight_bytes_per_token=variant_bytes,
                 roofline_fraction=round(NEW_TOKENS / variant_time / (statistics.median(b[0] for b in bandwidths) / variant_bytes), 3))
    if "decode_b16" in rows:
        (our_time, our_cpu, our_tokens), (their_time, their_cpu, their_tokens) = alternate(
            [lambda: ours(engine, prompts), lambda: theirs(prompts)], repeats)
        identical = our_tokens == their_tokens
        ok &= identical
        total = CONCURRENT * NEW_TOKENS
        emit("decode_b16", total / our_time, total / their_time, "tok/s", name, identical=identical, target_ratio=4.0,
             requests=CONCURRENT, ours_cpu=round(total / our_cpu, 2), baseline_cpu=round(total / their_cpu, 2))
    if "decode_b16_bf16" in rows:
        variant_engine = Engine(build_model(config, seed=0, dtype=torch.bfloat16).eval().to(DEVICE),
                                max_num_seqs=CONCURRENT, prefix_caching=False)
        (variant_time, variant_cpu, variant_tokens), (their_time, their_cpu, their_tokens) = alternate(
            [lambda: ours(variant_engine, prompts), lambda: theirs(prompts)], repeats)
        total = CONCURRENT * NEW_TOKENS
        agreement = sum(a == b for ours_row, theirs_row in zip(variant_tokens, their_tokens, strict=True)
                        for a, b in zip(ours_row, theirs_row, strict=True)) / total
        emit("decode_b16_bf16", total / variant_time, total / their_time, "tok/s", name, target_ratio=4.0,
             requests=CONCURRENT, token_agreement_with_fp32=round(agreement, 3),
             ours_cpu=round(total / variant_cpu, 2), baseline_cpu=round(total / their_cpu, 2))
    if "kv_bytes_per_token" in rows:
        bf16_engine = Engine(build_model(config, seed=0, dtype=torch.bfloat16).to(DEVICE), cache_memory=64 << 20)
        pool = bf16_engine.cache
        measured = sum(b.numel() * b.element_size() for layer in pool.layers for b in layer) // (pool.num_blocks * pool.block_size)
        formula = cache_bytes_per_token(config, torch.bfloat16)
        ok &= measured == formula
        if config.is_mla:  # the naive MLA cache: per-head keys (nope + rope) and values
            naive = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 2
        else:  # a multi-head cache: keys and values for every query head
            naive = config.num_hidden_layers * config.num_attention_heads * config.attention_head_dim * 2 * 2
        emit("kv_bytes_per_token", measured, naive, "bytes", name, equals_formula=measured == formula,
             formula=formula, compression=round(naive / measured, 2))
    return ok


# ----- MTP: a nano model trained here, then speculative against plain decoding -----------------------
def trained_mtp_model(layers: int, steps: int, seconds: float):
    """The nano preset (with `layers` layers) and its MTP layer trained on generated task text (cached under runs/)."""
    from nanoseek.checkpoint import load_pretrained
    from nanoseek.data.tasks import task_documents
    from nanoseek.tokenizer import Tokenizer

    directory = MTP_DIR / f"bench-mtp-nano-L{layers}"
    if (directory / "model.safetensors").is_file():
        return load_pretrained(directory, device=DEVICE), Tokenizer.from_pretrained(directory)
    documents = task_documents(6000, seed=0)
    tokenizer = Tokenizer.train(documents, vocab_size=2048)
    stream = []
    for ids in tokenizer.encode_batch(documents):
        stream += [tokenizer.bos_id, *ids, tokenizer.eos_id]
    data = torch.tensor(stream)
    model = build_model(ModelConfig.from_preset("nano", num_hidden_layers=layers), seed=0, device=DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(0)
    batch, length = 8, 128
    started = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=generator)
        window = torch.stack([data[s : s + length + 1] for s in starts.tolist()]).to(DEVICE)
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50) * max(0.1, 1 - step / steps)
        output = model(window[:, :-1], labels=window[:, 1:], mtp_weight=1.0)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"# mtp training step {step}: lm {output.lm_loss.item():.3f} mtp {output.mtp_loss.item():.3f}",
                  file=sys.stderr, flush=True)
        if time.perf_counter() - started > seconds:
            break
    model.eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def bench_mtp(layers: int, repeats: int, steps: int, seconds: float, draft_counts: list[int]) -> bool:
    """Plain greedy decoding against speculative decoding with each number of drafts per step, all
    run alternately; one row per draft count (the MTP depth drafts beyond the first from its own output)."""
    from nanoseek.data.tasks import make_mixed_problems

    model, tokenizer = trained_mtp_model(layers, steps, seconds)
    prompts = [tokenizer.encode(p.prompt + "\n", add_special_tokens=True)
               for p in make_mixed_problems("test", 8, seed=7)]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    plain = Engine(model, tokenizer, prefix_caching=False)  # the prompts repeat: measure decoding, not reuse
    speculative = [Engine(model, tokenizer, speculative=True, num_speculative_tokens=k, prefix_caching=False)
                   for k in draft_counts]

    def run(engine: Engine):
        return [engine.generate(prompt, params)[0].outputs[0].token_ids for prompt in prompts]

    (plain_time, plain_cpu, plain_tokens), *measured = alternate(
        [lambda: run(plain)] + [lambda engine=engine: run(engine) for engine in speculative], repeats)
    total = len(prompts) * NEW_TOKENS
    ok = True
    for k, engine, (spec_time, spec_cpu, spec_tokens) in zip(draft_counts, speculative, measured, strict=True):
        identical = plain_tokens == spec_tokens
        ok &= identical
        stats = engine.stats
        emit("mtp_speculative_b1", total / spec_time, total / plain_time, "tok/s",
             f"nano, {layers} layers (MTP trained on tasks), {k} draft(s) per step",
             ours_cpu=round(total / spec_cpu, 2), baseline_cpu=round(total / plain_cpu, 2),
             identical_to_plain=identical, num_speculative_tokens=k, acceptance_rate=round(stats.acceptance_rate, 4),
             mean_accepted_length=round(stats.mean_accepted_length, 3), target_ratio=1.5, target_acceptance=0.8)
    return ok


def main() -> None:
    all_rows = ["decode_b1_fp32", "roofline_b1_fp32", "matmul_floor_b1_fp32", "decode_b1_bf16", "decode_b1_int8",
                "decode_b16", "decode_b16_bf16", "kv_bytes_per_token", "mtp_speculative_b1"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["small", "qwen2-small"])
    parser.add_argument("--rows", nargs="+", default=all_rows, choices=all_rows)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both sides run (matmul_floor: CPU only)")
    parser.add_argument("--mtp-layers", type=int, nargs="+", default=[4, 12], help="depths of the MTP nano models")
    parser.add_argument("--mtp-drafts", type=int, nargs="+", default=[1, 2, 3],
                        help="drafts per speculative step, one row each (1 = the MTP depth alone)")
    parser.add_argument("--mtp-steps", type=int, default=3000, help="training steps of an MTP nano model")
    parser.add_argument("--mtp-seconds", type=float, default=900, help="training time limit of an MTP nano model")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ok = True
    rows = set(args.rows)
    for name in args.configs:
        if rows - {"mtp_speculative_b1"}:
            ok &= bench_config(name, rows, args.repeats)
    if "mtp_speculative_b1" in rows:
        for layers in args.mtp_layers:
            ok &= bench_mtp(layers, args.repeats, args.mtp_steps, args.mtp_seconds, args.mtp_drafts)
    if not ok:
        sys.exit("tokens differed where they must be identical (or the cache size did not match the formula)")


if __name__ == "__main__":
    main()
