"""BatchedLBFGS on its own: what it converges to, that images of a batch do not share anything, and what a
rejected curvature pair does (nothing)."""

import torch

from style_engine.lbfgs import FIRST_STEP, BatchedLBFGS

N = 50


def quadratic(seed: int):
    """f(x) = 1/2 (x - c)^T A (x - c) with A diagonal, eigenvalues spread over 1 ... 100: minimum at c."""
    generator = torch.Generator().manual_seed(seed)
    curvature = torch.logspace(0, 2, N, dtype=torch.float64)[torch.randperm(N, generator=generator)]
    centre = torch.rand(N, generator=generator, dtype=torch.float64)
    return curvature, centre


def gradient_step(optimizer: BatchedLBFGS, gradient) -> None:
    optimizer.x.grad = gradient(optimizer.x.detach())
    optimizer.step()


def quadratic_gradient(problems):
    curvature = torch.stack([a for a, _ in problems])
    centre = torch.stack([c for _, c in problems])
    return lambda x: curvature * (x - centre)


def minimise(problems, steps: int) -> torch.Tensor:
    x = torch.zeros(len(problems), N, dtype=torch.float64, requires_grad=True)
    optimizer = BatchedLBFGS(x, lr=1.0, history=10)
    for _ in range(steps):
        gradient_step(optimizer, quadratic_gradient(problems))
    return x.detach()


def test_a_quadratic_reaches_its_known_minimum():
    problem = quadratic(0)
    x = minimise([problem], steps=150)  # a fixed unit step converges linearly, as torch.optim.LBFGS's does
    torch.testing.assert_close(x[0], problem[1], atol=1e-5, rtol=0)


def test_a_batch_of_two_equals_two_solo_runs():
    problems = [quadratic(1), quadratic(2)]
    together = minimise(problems, steps=25)
    for row, problem in enumerate(problems):
        alone = minimise([problem], steps=25)[0]
        assert (together[row] - alone).abs().max() <= 1e-6
    assert (together[0] - together[1]).abs().max() > 0.1  # two different problems, not one answer twice


def test_a_rejected_pair_changes_nothing():
    """Two optimisers with the same history; one is then offered a pair of negative curvature (the gradient
    falls along the step, as on a concave stretch). It must store nothing and point where the other points."""
    problem = quadratic(3)
    gradient = quadratic_gradient([problem])
    pair = []
    for _ in range(2):
        x = torch.zeros(1, N, dtype=torch.float64, requires_grad=True)
        optimizer = BatchedLBFGS(x, history=4)
        for _ in range(6):  # more pairs than the ring holds: a rejected pair must not overwrite the oldest
            gradient_step(optimizer, gradient)
        pair.append(optimizer)
    stored, offered = pair[0], pair[1]
    before = {name: getattr(offered, name).clone() for name in ("s", "y", "rho", "gamma")}
    g = gradient(offered.x.detach()).flatten(1)
    offered.previous = (offered.x.detach().flatten(1) - 0.01, g + 0.01)  # s = +0.01, y = -0.01: y.s < 0
    offered.x.grad = gradient(offered.x.detach())
    direction_after = offered._direction(g)  # what step() would move along, before it is taken
    offered._remember(offered.x.detach().flatten(1) - offered.previous[0], g - offered.previous[1])
    for name, value in before.items():
        assert torch.equal(getattr(offered, name), value), name
    torch.testing.assert_close(offered._direction(g), stored._direction(g), atol=0, rtol=0)
    torch.testing.assert_close(direction_after, stored._direction(g), atol=0, rtol=0)


def test_while_no_pair_is_accepted_no_pixel_moves_more_than_the_first_step():
    """A concave function rejects every pair; each step must stay as short as the first, not lr * g: with the
    style loss's gradients (style_weight 1e6) a plain gradient step throws every pixel to 0 or 1."""
    x = torch.full((2, N), 0.5, dtype=torch.float64, requires_grad=True)
    optimizer = BatchedLBFGS(x, lr=1.0)
    scale = torch.tensor([[1e6], [1.0]], dtype=torch.float64)  # two images whose gradients differ by 1e6
    for _ in range(5):
        before = x.detach().clone()
        gradient_step(optimizer, lambda x: -scale * (x - 0.4))  # f = -scale/2 |x - 0.4|^2: concave
        assert (x.detach() - before).abs().amax() <= FIRST_STEP * (1 + 1e-12)
