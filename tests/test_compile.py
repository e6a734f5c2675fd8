"""torch.compile(fullgraph=True) of code calling the public API, in a fresh process.

A fresh interpreter makes the compiled call the very first one, so the
backend is loaded (extension imported, custom ops registered) while Dynamo
traces: that must not break the graph.
"""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import torch, facd_fast

    def step(s, t, n, m):
        return facd_fast.contrastive_loss(s, t, n, mask=m)

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
    print("ok", facd_fast.backends.resolve("auto", s.device)[0])
    """
)


def test_first_call_under_compile_fullgraph():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("ok")
