"""On CUDA (skipped elsewhere): bf16 variants match CPU fp32, and every size fits in teacher + student memory."""

import pytest
import torch

from services.family import load_family

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOKENS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 61]])


def test_cuda_bf16_variants_match_cpu_and_share_memory(tiny_pair):
    cpu = load_family(*tiny_pair, device="cpu")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    gpu = load_family(*tiny_pair, device="cuda", dtype="bfloat16")
    pair_bytes = torch.cuda.memory_allocated() - before
    variants = {n: gpu.variant(n) for n in gpu.sizes}
    # measured before any forward: the first matmul allocates cuBLAS's workspace, which memory_allocated counts
    assert torch.cuda.memory_allocated() - before <= 1.05 * pair_bytes
    for n, variant in variants.items():
        with torch.no_grad():
            expected = torch.log_softmax(cpu.variant(n)(TOKENS).logits.float(), -1)
            actual = torch.log_softmax(variant(TOKENS.cuda()).logits.float(), -1).cpu()
        torch.testing.assert_close(actual, expected, rtol=0.05, atol=0.1)


def test_distillation_on_cuda_in_bf16_autocast_lowers_the_loss(llama_pair, tmp_path):
    import json

    from services.train.loop import TrainConfig, run_training
    from services.train.losses import LossWeights
    from tests.conftest import TINY_TEXT

    corpus, out = tmp_path / "text.txt", tmp_path / "run"
    corpus.write_text(TINY_TEXT * 10)
    run_training(TrainConfig(teacher=str(llama_pair[0]), data=str(corpus), out=str(out), max_steps=30, batch_size=2,
                             seq_len=16, lr=3e-4, warmup_steps=2, save_every=10, eval_every=10, progress=False,
                             device="cuda", weights=LossWeights(ce=0, kl=1, cos=20, patch=1)))
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    assert json.loads((out / "manifest_entry.json").read_text())["training"]["device"].startswith("cuda")


def test_teacher_samples_on_cuda(llama_pair, tmp_path):
    from services.train.synth import SynthConfig, synthesize

    out = tmp_path / "synth.jsonl"
    summary = synthesize(SynthConfig(teacher=str(llama_pair[0]), out=str(out), tokens=200, batch_size=8,
                                     max_new_tokens=32, device="cuda"))
    assert summary["tokens"] >= 200 and out.read_text().count("\n") >= 200 // 32


def test_the_serving_batch_on_cuda_bf16_matches_cpu_fp32(tiny_pair):
    """Mixed sizes through the torch step backend on the GPU: logits close to CPU fp32, per step."""
    from services.engine.batch import Sequence
    from services.engine.family_batch import FamilyBatch
    from services.engine.interface import SamplingParams
    from tests.services.engine.reference import record_logits, step_logits

    cpu = load_family(*tiny_pair, device="cpu")
    gpu = load_family(*tiny_pair, device="cuda", dtype="bfloat16")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts, record = [[5, 17, 42], [99, 7, 3, 250, 61, 11, 8]], {}
    outputs = [[] for _ in prompts]
    seqs = [Sequence(p, params, lambda d, out=out: out.extend(d.token_ids), num_layers=n)
            for n, p, out in zip((gpu.sizes[0], gpu.sizes[-1]), prompts, outputs)]
    batch = FamilyBatch(gpu, seqs, gpu.tokenizer, {2}, pad_id=0)
    record_logits(batch, record)
    batch.prefill()
    while not batch.done:
        batch.step()
    for seq, got in zip(seqs, outputs):
        want = torch.log_softmax(step_logits(cpu.variant(seq.num_layers), seq.prompt_ids, got), -1)
        ours = torch.log_softmax(torch.stack(record[id(seq)]).cpu(), -1)
        torch.testing.assert_close(ours, want, rtol=0.05, atol=0.1)
