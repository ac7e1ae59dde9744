"""GPU tier: the kernels compiled and run on a real CUDA device, at GPT-2 small's sizes.

Skipped with a reason on machines without CUDA (CI has none). On a GPU run with
`TRITON_INTERPRET=0 python -m pytest tests/test_kernels_gpu.py`: conftest only sets the
interpreter when the variable is unset.
"""

import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="TRITON_INTERPRET=1: set TRITON_INTERPRET=0 to compile for the GPU"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B", [1, 8, 64])
def test_exit_confidence_on_gpu(dtype, B):
    import earlyexit.kernels.dispatch as K

    d, V = 768, 50257
    h = torch.randn(B, d, device="cuda", dtype=dtype)
    W = (torch.randn(V, d, device="cuda") * 0.05).to(dtype)
    ln_w, ln_b = torch.rand(d, device="cuda") + 0.5, torch.randn(d, device="cuda") * 0.1
    got = K.exit_confidence(h, ln_w, ln_b, W)
    assert K.last_backend["exit_confidence"] == "triton"
    ref = K.exit_confidence_reference(h, ln_w, ln_b, W)
    assert (got.token == ref.token).float().mean() == 1.0
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_layer_check_and_state_copy_on_gpu():
    import earlyexit.kernels.dispatch as K

    B, d, L, nh = 4, 768, 12, 12
    x, delta = torch.randn(B, d, device="cuda"), torch.randn(B, d, device="cuda")
    ln_w, ln_b = torch.rand(d, device="cuda") + 0.5, torch.randn(d, device="cuda") * 0.1
    C, cb = torch.randn(3, d, device="cuda"), torch.randn(3, device="cuda")
    h, probs = K.layer_check(x, delta, ln_w, ln_b, C, cb)
    h_ref, probs_ref = K.layer_check_reference(x, delta, ln_w, ln_b, C, cb)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(probs, probs_ref, atol=1e-4, rtol=1e-4)
    w = K.StateCopyWeights(torch.rand(L, d, device="cuda"), torch.randn(L, d, device="cuda"),
                           torch.randn(L, 2 * d, d, device="cuda") * 0.02, torch.randn(L, 2 * d, device="cuda"), 1e-5)
    caches = [torch.zeros(L, B, nh, 32, d // nh, device="cuda") for _ in range(4)]
    K.state_copy(h, w, caches[0], caches[1], 3, 9, 17)
    K.state_copy_reference(h, w, caches[2], caches[3], 3, 9, 17)
    torch.testing.assert_close(caches[0], caches[2], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(caches[1], caches[3], atol=1e-3, rtol=1e-3)
