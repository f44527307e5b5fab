"""The CUDA paths: the same model, engine, FP8 and training code on a GPU, checked against the CPU.

Skipped where no GPU is present (CI has none); run on a GPU host with `pytest tests/test_cuda.py`.
Weights are built on the CPU and copied over, so both devices hold the same numbers. CUDA's fp32
matmuls are kept off TF32 here (torch's default for matmuls), so fp32 results agree to rounding.
"""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import peaky_model, reference_greedy
from model_configs import tiny_config
from test_model_parity import load_transformers, random_tokens, randomized_model
from train_fixtures import SyntheticBatches

from nanoseek import fp8
from nanoseek.checkpoint import load_pretrained
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.quant import quantize_model
from nanoseek.model import build_model
from nanoseek.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
PROMPTS = [[5, 6, 7, 8, 9], [3, 4], [11] * 13, [2]]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double().cpu() - expected.double().cpu()).norm() / expected.double().cpu().norm())


@pytest.fixture(autouse=True)
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("name", ["v3", "v2-lite-greedy", "qwen2", "llama3"])
def test_loss_logits_and_gradients_on_cuda_equal_the_cpu(name):
    tokens = random_tokens(tiny_config(name).vocab_size, batch=2, seq=40)
    labels = torch.roll(tokens, -1, dims=1)
    results = {}
    for device in ("cpu", "cuda"):
        copy = randomized_model(name).train().to(device)
        output = copy(tokens.to(device), labels=labels.to(device), return_logits=True)
        output.loss.backward()
        grads = {n: p.grad.detach().cpu() for n, p in copy.named_parameters() if p.grad is not None}
        results[device] = (output.loss.detach().cpu(), output.logits.detach().cpu(), grads)
    (cpu_loss, cpu_logits, cpu_grads), (gpu_loss, gpu_logits, gpu_grads) = results["cpu"], results["cuda"]
    assert float(gpu_loss) == pytest.approx(float(cpu_loss), rel=1e-5)
    assert relative_error(gpu_logits, cpu_logits) < 1e-5
    assert cpu_grads.keys() == gpu_grads.keys() and len(cpu_grads) > 10
    for key in cpu_grads:
        assert relative_error(gpu_grads[key], cpu_grads[key]) < 1e-4, key


@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_logits_match_transformers_on_cuda(name, tmp_path):
    model = randomized_model(name)
    model.save_pretrained(tmp_path)
    reference = load_transformers(tmp_path).to(CUDA)
    model = model.to(CUDA)
    tokens = random_tokens(model.config.vocab_size).to(CUDA)
    with torch.no_grad():
        assert relative_error(model(tokens).logits, reference(tokens).logits) < 1e-5


@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_bf16_weights_and_autocast_track_fp32(name):
    model = randomized_model(name).to(CUDA)
    tokens = random_tokens(model.config.vocab_size).to(CUDA)
    with torch.no_grad():
        reference = model(tokens).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = model(tokens).logits
        bf16 = load_bf16(model)(tokens).logits
    assert relative_error(autocast, reference) < 0.02
    assert relative_error(bf16, reference) < 0.03


def load_bf16(model):
    copy = build_model(model.config, device=CUDA, dtype=torch.bfloat16)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.mark.parametrize("name", ["v3", "v2-lite-greedy", "qwen2"])
def test_cached_decoding_on_cuda_equals_a_full_forward_token_by_token(name):
    model = peaky_model(name).to(CUDA)
    engine = Engine(model, block_size=4)
    assert engine.cache.layers[0][0].device.type == "cuda"
    for prompt, output in zip(PROMPTS, engine.generate(PROMPTS, GREEDY), strict=True):
        tokens, reference = reference_greedy(model, prompt, GREEDY.max_tokens)
        assert output.outputs[0].token_ids == tokens
        expected = [float(step[token]) for step, token in zip(reference, tokens, strict=True)]
        assert output.outputs[0].logprobs == pytest.approx(expected, abs=1e-4)


def test_moe_decode_on_cuda_runs_every_expert_at_once_with_the_naive_result():
    """A few tokens on a GPU run all experts as two products (no host sync): the same sums as one token
    and one expert at a time."""
    experts = peaky_model("v3").to(CUDA).moe_layers()[0].experts
    generator = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(5, experts.gate_up_proj.shape[-1], device=CUDA, generator=generator)
    indices = torch.stack([torch.randperm(experts.num_experts, device=CUDA, generator=generator)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, device=CUDA, generator=generator)
    with torch.no_grad():
        assert experts.all_at_once_pays(indices)
        assert relative_error(experts(x, weights, indices), experts.naive_forward(x, weights, indices)) < 1e-5


def test_cuda_engine_gives_the_cpu_engines_tokens_absorbed_or_not():
    model = peaky_model("v3")
    expected = [o.outputs[0].token_ids for o in Engine(model, block_size=4).generate(PROMPTS, GREEDY)]
    tokens, _ = reference_greedy(model, PROMPTS[0], GREEDY.max_tokens)
    assert expected[0] == tokens
    model = model.to(CUDA)
    for absorb in (True, False):
        outputs = Engine(model, block_size=4, absorb=absorb).generate(PROMPTS, GREEDY)
        assert [o.outputs[0].token_ids for o in outputs] == expected


def test_seeded_sampling_on_cuda_ignores_batch_mates_and_speculation_keeps_greedy_output():
    model = peaky_model("v3", logit_scale=3.0).to(CUDA)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=10, seed=7, ignore_eos=True)
    alone = Engine(model).generate([5, 6, 7], params, n=2)[0]
    crowded = Engine(model, max_prefill_tokens=6).generate(
        [[9, 9], [5, 6, 7], list(range(3, 20))], [SamplingParams(max_tokens=3), params, SamplingParams(max_tokens=9)],
        n=2,
    )[1]
    assert [o.token_ids for o in crowded.outputs] == [o.token_ids for o in alone.outputs]
    plain = Engine(model).generate(PROMPTS, GREEDY)
    engine = Engine(model, speculative=True, num_speculative_tokens=2)
    speculative = engine.generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in speculative] == [o.outputs[0].token_ids for o in plain]
    assert engine.stats.spec_draft_tokens > 0


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_models_on_cuda_stay_close_and_generate(scheme):
    reference = peaky_model("v3", logit_scale=3.0).to(CUDA)
    model = quantize_model(peaky_model("v3", logit_scale=3.0), scheme, dtype=torch.bfloat16).to(CUDA)
    tokens = torch.tensor([list(range(3, 40))], device=CUDA)
    with torch.no_grad():
        assert relative_error(model(tokens).logits, reference(tokens).logits) < (0.03 if scheme == "int8" else 0.07)
    output = Engine(model).generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    assert len(output.outputs[0].token_ids) == 6


@pytest.mark.skipif(not torch.cuda.is_available() or not fp8.has_blockwise_scaled_mm(torch.device("cuda")),
                    reason="needs cuBLAS blockwise FP8 (Hopper, CUDA >= 12.9)")
@pytest.mark.parametrize("m, k, n", [(256, 512, 1408), (128, 640, 256)])
def test_cublas_fp8_gemms_equal_the_reference_gemm(m, k, n):
    """Same quantized operands, cuBLAS's blockwise-scaled GEMM against dequantize-then-fp32-matmul.
    Hopper's FP8 tensor cores accumulate in reduced precision (V3 paper, 3.3.2), hence 1e-3."""
    generator = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(m, k, device=CUDA, generator=generator)
    w = torch.randn(n, k, device=CUDA, generator=generator) * 0.05
    grad_y = torch.randn(m, n, device=CUDA, generator=generator)
    x_fp8, x_scale = fp8.quantize_tiles(x)
    w_fp8, w_scale = fp8.quantize_blocks(w)
    g_fp8, g_scale = fp8.quantize_tiles(grad_y)
    gt_fp8, gt_scale = fp8.quantize_tiles(grad_y.t().contiguous())
    xt_fp8, xt_scale = fp8.quantize_tiles(x.t().contiguous())
    cases = [
        (x_fp8, x_scale, w_fp8, w_scale, 128),  # forward
        (g_fp8, g_scale, w_fp8.t(), w_scale.t(), 128),  # input gradient
        (gt_fp8, gt_scale, xt_fp8, xt_scale, 1),  # weight gradient
    ]
    for a, a_scale, b, b_scale, tile_rows in cases:
        expected = fp8._reference_gemm(a, a_scale, b.contiguous(), b_scale.contiguous(), tile_rows, torch.float32)
        actual = fp8._cublas_gemm(a, a_scale, b, b_scale, tile_rows, torch.float32)
        assert relative_error(actual, expected) < 1e-3


def test_fp8_linear_on_cuda_takes_cublas_and_tracks_fp32():
    generator = torch.Generator(device=CUDA).manual_seed(0)
    x = torch.randn(256, 512, device=CUDA, generator=generator, requires_grad=True)
    w = (torch.randn(384, 512, device=CUDA, generator=generator) * 0.05).requires_grad_()
    grad_y = torch.randn(256, 384, device=CUDA, generator=generator)
    fp8.fp8_linear(x, w, None).backward(grad_y)
    expected_x, expected_w = grad_y @ w.detach(), grad_y.t() @ x.detach()
    assert relative_error(x.grad, expected_x) < 0.06 and relative_error(w.grad, expected_w) < 0.06
    assert not fp8._scaled_mm_failed


@pytest.mark.parametrize("mode, tolerance", [("bf16", 0.02), ("fp16", 0.01), ("fp8", 0.02)])
def test_every_precision_on_cuda_tracks_fp32(mode, tolerance):
    def run(precision):
        config = TrainConfig(global_batch_size=4, micro_batch_size=2, seq_len=16, max_steps=6, warmup_steps=1,
                             peak_tflops=1.0, precision=precision, device="cuda")
        trainer = Trainer(build_model(tiny_config("v3"), seed=0).to(CUDA), config, "unused")
        batches = SyntheticBatches(96, 2, 16)
        return [trainer.train_step(batches)["loss"] for _ in range(6)]

    reference, ours = run("fp32"), run(mode)
    assert all(abs(a - b) / a < tolerance for a, b in zip(reference, ours, strict=True)), (reference, ours)
    assert ours[-1] < ours[0]


def test_a_checkpoint_written_from_cuda_loads_on_the_cpu_with_the_same_logits(tmp_path):
    model = randomized_model("v3").to(CUDA)
    model.save_pretrained(tmp_path)
    tokens = random_tokens(model.config.vocab_size)
    loaded = load_pretrained(tmp_path)
    assert next(loaded.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert relative_error(model(tokens.to(CUDA)).logits, loaded(tokens).logits) < 1e-5
    on_gpu = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda")
    assert next(on_gpu.parameters()).device.type == "cuda"
    assert on_gpu.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
