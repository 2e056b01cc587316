"""L-BFGS for a batch of images, each with its own curvature history.

Why not torch.optim.LBFGS: it flattens all parameters into one vector, so images optimised together in a
batch would share one curvature estimate and step size and a batched result would differ from a solo one;
and it reads scalars back to the host several times per step (`float(loss)`, `if ys > 1e-10`), which stalls
a GPU. Here every quantity is per image and kept on the device: each image has its own ring of curvature
pairs and its own count of them, and a pair that fails the curvature condition is not stored at all (it takes
no slot and pushes out no older pair), decided by masks rather than branches. Like torch.optim.LBFGS without
`line_search_fn` (the setting style-transfer implementations use), it takes a fixed step `lr` along the
quasi-Newton direction.

Until an image has a curvature pair its direction is the plain gradient, whose length depends on the loss
weights and the image size; that step moves no pixel by more than FIRST_STEP times lr. torch's
min(1, 1/|g|_1) for the first step was so short here that the second step overshot: at 128 px the loss was 544
after 10 iterations with torch's first step and 398 with ours (2026-11-28). The same bound applies while the
first pairs are rejected: an unscaled gradient step at style_weight 1e6 would throw every pixel to 0 or 1.
"""

import torch

FIRST_STEP = 0.05  # largest change of any pixel value (in [0, 1]) of a step without curvature pairs, times lr
CURVATURE_MIN = 1e-10  # y.s at or below this fails the curvature condition: the pair would make H indefinite
HISTORY = 20  # curvature pairs kept per image; more helped no faster in benchmarks/ and costs memory (memory.py)


class BatchedLBFGS:
    """Minimises over `x` (B, ...), one image per row; call `step()` after each backward pass fills x.grad."""

    def __init__(self, x: torch.Tensor, lr: float = 1.0, history: int = HISTORY):
        self.x, self.lr, self.history = x, lr, history
        batch, n = x.shape[0], x[0].numel()
        self.s = x.new_zeros(history, batch, n)  # past steps x_{k+1} - x_k, image b's newest in slot stored[b]-1
        self.y = x.new_zeros(history, batch, n)  # past gradient changes g_{k+1} - g_k
        self.rho = x.new_zeros(history, batch)  # 1 / (y.s); 0 marks an empty slot
        self.gamma = x.new_ones(batch)  # scale of the initial inverse Hessian, (s.y)/(y.y) of the newest pair
        self.stored = torch.zeros(batch, dtype=torch.long, device=x.device)  # pairs accepted so far, per image
        self.offered = 0  # pairs offered so far: no image can have stored more
        self.rows = torch.arange(batch, device=x.device)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self) -> None:
        x, g = self.x.detach().flatten(1), self.x.grad.detach().flatten(1)
        if self.previous is not None:
            self._remember(x - self.previous[0], g - self.previous[1])
        without_pairs = self.lr * FIRST_STEP / g.abs().amax(1).clamp_min(1e-30)
        step_size = torch.where(self.stored > 0, self.lr, without_pairs)
        direction = self._direction(g)
        self.previous = (x.clone(), g.clone())
        self.x.add_((direction * step_size[:, None]).view_as(self.x))

    def state(self, max_bytes: int) -> dict[str, torch.Tensor]:
        """Of an image optimised alone, what a later optimiser needs to go on as this one would (restore): its
        last point and gradient, and its newest curvature pairs oldest first, as many as fit in `max_bytes`."""
        vector_bytes = 4 * self.x[0].numel()
        if self.previous is None or max_bytes < 2 * vector_bytes:
            return {}
        kept = min(int(self.stored[0]), self.history, max_bytes // (2 * vector_bytes) - 1)
        slots = [(int(self.stored[0]) - kept + age) % self.history for age in range(kept)]
        return {"previous_x": self.previous[0][0], "previous_g": self.previous[1][0],
                "s": self.s[slots, 0], "y": self.y[slots, 0]}

    @torch.no_grad()
    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """Go on from another optimiser's `state` (of an image alone); its pairs are offered again, so that those
        failing the curvature condition (a forged state) are left out as they would have been."""
        if not state:
            return
        for s, y in zip(state["s"].to(self.x.device), state["y"].to(self.x.device)):
            self._remember(s[None], y[None])
        self.previous = (state["previous_x"][None].to(self.x.device), state["previous_g"][None].to(self.x.device))

    def _remember(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Store each image's pair in its next slot, where it meets the curvature condition."""
        ys = (y * s).sum(1)
        accepted = ys > CURVATURE_MIN
        slot = self.stored % self.history
        keep = accepted[:, None]
        self.s[slot, self.rows] = torch.where(keep, s, self.s[slot, self.rows])
        self.y[slot, self.rows] = torch.where(keep, y, self.y[slot, self.rows])
        self.rho[slot, self.rows] = torch.where(accepted, 1.0 / ys.clamp_min(CURVATURE_MIN), self.rho[slot, self.rows])
        self.gamma = torch.where(accepted, ys / (y * y).sum(1).clamp_min(1e-30), self.gamma)
        self.stored += accepted
        self.offered += 1

    def _pair(self, age: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each image's pair stored `age` pairs before its newest (s, y, rho); rho is 0 where there is none,
        since until its ring is full, the slots before an image's first pair are empty."""
        slot = (self.stored - 1 - age) % self.history
        return self.s[slot, self.rows], self.y[slot, self.rows], self.rho[slot, self.rows]

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        """-H g by the two-loop recursion, newest pair first; empty slots (rho = 0) contribute nothing. The
        pairs are gathered again in the second loop rather than kept: keeping them would double the memory."""
        ages = range(min(self.offered, self.history))
        q, alphas = g.neg(), []
        for age in ages:
            s, y, rho = self._pair(age)
            alphas.append(rho * (s * q).sum(1))
            q = q - alphas[-1][:, None] * y
        r = q * self.gamma[:, None]
        for age in reversed(ages):
            s, y, rho = self._pair(age)
            beta = rho * (y * r).sum(1)
            r = r + s * (alphas[age] - beta)[:, None]
        return r
