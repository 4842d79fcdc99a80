"""Sinkhorn marginals, permutation recovery, agreement with the naive algorithm; OT loss and fusion
against the naive plan on a hand-computed cosine cost."""
import torch
import torch.nn.functional as F

from avnano.ot import cosine_cost, ot_fuse, ot_loss, sinkhorn


def naive_sinkhorn(cost, eps, iters):
    K = torch.exp(-cost / eps)
    a = torch.full((cost.shape[0],), 1.0 / cost.shape[0], dtype=cost.dtype)
    b = torch.full((cost.shape[1],), 1.0 / cost.shape[1], dtype=cost.dtype)
    u, v = torch.ones_like(a), torch.ones_like(b)
    for _ in range(iters):
        u = a / (K @ v)
        v = b / (K.T @ u)
    return u[:, None] * K * v[None]


def test_marginals():
    torch.manual_seed(0)
    cost = torch.rand(6, 9)
    P = sinkhorn(cost, eps=0.1, iters=200)
    assert torch.allclose(P.sum(1), torch.full((6,), 1 / 6), atol=1e-4)
    assert torch.allclose(P.sum(0), torch.full((9,), 1 / 9), atol=1e-4)
    a = torch.tensor([0.5, 0.3, 0.2])
    b = torch.tensor([0.25, 0.25, 0.25, 0.25])
    P = sinkhorn(torch.rand(3, 4), a, b, eps=0.1, iters=300)
    assert torch.allclose(P.sum(1), a, atol=1e-4) and torch.allclose(P.sum(0), b, atol=1e-4)


def test_plan_concentrates_on_obvious_permutation():
    perm = torch.tensor([3, 0, 4, 1, 2])
    cost = torch.ones(5, 5)
    cost[torch.arange(5), perm] = 0.0
    P = sinkhorn(cost, eps=0.05, iters=100)
    assert torch.equal(P.argmax(1), perm)
    assert (P[torch.arange(5), perm] > 0.99 / 5).all()


def test_log_domain_equals_naive_when_well_conditioned():
    torch.manual_seed(1)
    cost = torch.rand(4, 7, dtype=torch.float64)
    assert torch.allclose(sinkhorn(cost, eps=0.5, iters=100), naive_sinkhorn(cost, 0.5, 100), atol=1e-10)


def by_hand(v, a):
    """LAVCap's cost 1 - cos(v_i, a_j) and the naive Sinkhorn plan on it (eps 0.1, 50 iterations)."""
    C = 1 - F.cosine_similarity(v[:, None], a[None], dim=-1)
    return C, naive_sinkhorn(C.detach().double(), 0.1, 50).to(C.dtype)


def test_cosine_cost_by_hand():
    v, a = torch.tensor([[1.0, 0.0], [3.0, 3.0]]), torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    h = 1 - 2 ** -0.5
    assert torch.allclose(cosine_cost(v, a), torch.tensor([[1.0, 2.0], [h, 1 + 2 ** -0.5]]))


def test_ot_loss_is_plan_times_cost_with_gradient_through_cost_only():
    torch.manual_seed(2)
    v = torch.randn(4, 8, requires_grad=True)
    a = torch.randn(6, 8, requires_grad=True)
    loss = ot_loss(v, a)
    loss.backward()
    v2, a2 = v.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    C, P = by_hand(v2, a2)
    want = (P * C).sum()  # P is a constant: the gradient flows through C only
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5) and loss.item() > 0
    assert torch.allclose(v.grad, v2.grad, atol=1e-5) and torch.allclose(a.grad, a2.grad, atol=1e-5)
    same = torch.randn(5, 8)
    assert ot_loss(same, same).item() < ot_loss(same, torch.randn(5, 8)).item()  # aligned streams cost less


def test_ot_fuse_mixes_by_plan():
    torch.manual_seed(3)
    v, a = torch.randn(3, 4), torch.randn(5, 4)
    fv, fa = ot_fuse(v, a)
    _, P = by_hand(v, a)
    assert torch.allclose(fv, v + 3 * P @ a, atol=1e-6) and torch.allclose(fa, a + 5 * P.T @ v, atol=1e-6)


def test_cost_stays_float32_under_bf16_autocast():
    # the cosine cost once followed autocast into bf16, and Sinkhorn divides it by eps = 0.1
    g = torch.Generator().manual_seed(0)
    v, a = torch.randn(6, 16, generator=g), torch.randn(4, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = cosine_cost(v, a)
        loss = ot_loss(v, a)
    assert cost.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.allclose(cost, cosine_cost(v, a), atol=0) and torch.allclose(loss, ot_loss(v, a), atol=1e-6)
