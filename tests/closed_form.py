"""The FACD distance gradients written out by hand (docs/loss.md, "Gradients").

An independent check of autograd through :mod:`facd_fast.reference`, and the
formulas the fused kernels implement. Plain PyTorch, materialising, small shapes.
"""
import torch

from facd_fast.reference import EPS_NORM, normalize_features


def _psi_prime(diff, distance):
    return torch.sign(diff) if distance == "l1" else 2.0 * diff


def _normalize_backward(x, grad_hat, normalize):
    """Gradient through phi: (g - phi <phi, g>) / ||v|| where ||v|| > EPS_NORM, else g / EPS_NORM."""
    if normalize == "none":
        return grad_hat
    norm = torch.linalg.vector_norm(x, dim=-3, keepdim=True)
    hat = x / norm.clamp_min(EPS_NORM)
    projected = (grad_hat - hat * (hat * grad_hat).sum(dim=-3, keepdim=True)) / norm.clamp_min(EPS_NORM)
    return torch.where(norm > EPS_NORM, projected, grad_hat / EPS_NORM)


def distances_backward(grad_pos, grad_neg, student, teacher, negatives, distance, normalize):
    """(g_student, g_teacher, g_negatives or None) of sum(grad_pos * d_pos + grad_neg * d_neg)."""
    s, t = normalize_features(student, normalize), normalize_features(teacher, normalize)
    batch, n_elements = s.shape[0], s[0].numel()
    view = (-1, 1, 1, 1)
    pos = _psi_prime(s - t, distance)
    g_s = grad_pos.view(view) * pos
    g_t = -grad_pos.view(view) * pos
    g_n = None
    if negatives is None:
        pairs = _psi_prime(s[:, None] - t[None, :], distance)  # (B, B, C, H, W), [i, k]
        off = (~torch.eye(batch, dtype=torch.bool)).to(s.dtype)
        weight = (grad_neg[:, None] / (batch - 1)) * off  # weight[i, k] of pair (s_i, t_k)
        g_s = g_s + (weight[..., None, None, None] * pairs).sum(dim=1)
        g_t = g_t - (weight[..., None, None, None] * pairs).sum(dim=0)
    else:
        n = normalize_features(negatives, normalize)
        pairs = _psi_prime(s[:, None] - n, distance)  # (B, K, C, H, W)
        weight = (grad_neg / negatives.shape[1]).view(-1, 1, 1, 1, 1)
        g_s = g_s + (weight * pairs).sum(dim=1)
        g_n = _normalize_backward(negatives, -weight * pairs / n_elements, normalize)
    g_s = _normalize_backward(student, g_s / n_elements, normalize)
    g_t = _normalize_backward(teacher, g_t / n_elements, normalize)
    return g_s, g_t, g_n
