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
    for n in gpu.sizes:
        with torch.no_grad():
            expected = torch.log_softmax(cpu.variant(n)(TOKENS).logits.float(), -1)
            actual = torch.log_softmax(gpu.variant(n)(TOKENS.cuda()).logits.float(), -1).cpu()
        torch.testing.assert_close(actual, expected, rtol=0.05, atol=0.1)
    assert torch.cuda.memory_allocated() - before <= 1.05 * pair_bytes
