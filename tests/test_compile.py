"""torch.compile(fullgraph=True) of code calling the public API, in a fresh process.

A fresh interpreter makes the compiled call the very first loss call: the
backend is resolved while Dynamo traces, and that must not break the graph.
The step's loss is FACDLoss's: the adaptive mask from the patch_mse op, then
the contrastive loss of each tap, backward included.
"""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch, facd_fast

    def step(s, t, n, m):
        return facd_fast.contrastive_loss(s, t, n, mask=m)

    def training_loss(s_feats, t_feats, sr_s, sr_t, hr):
        loss, diagnostics = facd_fast.FACDLoss((1.0, 0.5))(s_feats, t_feats, sr_s, sr_t, hr)
        return loss, diagnostics["mask"]

    torch.manual_seed(0)
    s = torch.randn(4, 8, 5, 6, requires_grad=True)
    t = torch.randn(4, 8, 5, 6)
    m = torch.tensor([True, False, True, True])
    compiled = torch.compile(step, fullgraph=True)
    for n in (None, torch.randn(4, 3, 8, 5, 6)):
        got = compiled(s, t, n, m)
        (got_grad,) = torch.autograd.grad(got, s)
        want = facd_fast.contrastive_loss(s, t, n, mask=m, backend="reference")
        (want_grad,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-7)
    s2 = torch.randn(4, 3, 6, 5, requires_grad=True)
    t2 = torch.randn(4, 3, 6, 5)
    hr = torch.rand(4, 3, 8, 8)
    sr_s, sr_t = (hr + 0.1 * torch.randn_like(hr)).clamp(0, 1), (hr + 0.05 * torch.randn_like(hr)).clamp(0, 1)
    got, got_mask = torch.compile(training_loss, fullgraph=True)([s, s2], [t, t2], sr_s, sr_t, hr)
    want, want_mask = training_loss([s, s2], [t, t2], sr_s, sr_t, hr)
    assert torch.equal(got_mask, want_mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    got_grads = torch.autograd.grad(got, [s, s2])
    want_grads = torch.autograd.grad(want, [s, s2])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    print("ok", facd_fast.api.resolve_backend("auto", s.device.type))
    """
)


def test_first_call_under_compile_fullgraph():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("ok")
