"""SGD and Adam on the ES estimate, with explicit fp32 state.

Both work on one part of one tensor at a time (`step_tensor`, called per
noise block), so the update never holds a second full copy of the parameters:
the accumulator is one block's size.  They return the step instead of applying
it, so the caller can refuse a non-finite step before it touches the master;
`acc` is the caller's scratch and may be overwritten.
"""
from __future__ import annotations

import numpy as np
import torch


class SGD:
    """step = scale * sum_k c_k eps_k (the paper's update when scale = alpha/N)."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.t = 0

    def begin(self) -> None:
        self.t += 1

    def step_tensor(self, i: int, theta: torch.Tensor, acc: torch.Tensor, scale: float, grad_scale: float,
                    alpha: float, part: slice = slice(None)) -> torch.Tensor:
        """The step for elements `part` of tensor i, flattened (`theta` and
        `acc` are those elements).  SGD: in place in acc, no allocation."""
        return acc.mul_(scale)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"t": np.array(self.t, dtype=np.int64)}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.t = int(state["t"])


class Adam(SGD):
    """Adam (ascent) on g = grad_scale * sum_k c_k eps_k; moments in fp32.

    `state_device` (default: `device`) holds the moments.  When it is the
    host and the weights are on a GPU, the moments are pinned host memory and
    each block's part is copied in, updated on the GPU and copied back
    (asynchronously, in stream order): the same arithmetic on the same device,
    so the same bits as moments on the card, for 16 bytes per parameter over
    PCIe per update instead of 8 bytes per parameter of card memory."""

    def __init__(self, names: list[str], shapes: list[tuple[int, ...]], beta1: float, beta2: float, eps: float,
                 device: str | torch.device = "cpu", state_device: str | torch.device | None = None):
        super().__init__(names)
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        where = torch.device(state_device if state_device is not None else device)
        self.streamed = where.type == "cpu" and torch.device(device).type == "cuda"
        self.m = [torch.zeros(s, dtype=torch.float32, device=where, pin_memory=self.streamed) for s in shapes]
        self.v = [torch.zeros(s, dtype=torch.float32, device=where, pin_memory=self.streamed) for s in shapes]

    def step_tensor(self, i, theta, acc, scale, grad_scale, alpha, part=slice(None)):
        m_home, v_home = self.m[i].view(-1)[part], self.v[i].view(-1)[part]
        if self.streamed:
            m, v = m_home.to(acc.device, non_blocking=True), v_home.to(acc.device, non_blocking=True)
        else:
            m, v = m_home, v_home
        g = acc.view(-1) * grad_scale
        m.mul_(self.beta1).add_(g, alpha=1 - self.beta1)
        v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        bc1 = 1 - self.beta1 ** self.t
        bc2 = 1 - self.beta2 ** self.t
        denom = (v / bc2).sqrt_().add_(self.eps)
        step = ((alpha / bc1) * m / denom).view(acc.shape)
        if self.streamed:
            m_home.copy_(m, non_blocking=True)
            v_home.copy_(v, non_blocking=True)
        return step

    def state_dict(self):
        out = super().state_dict()
        for n, m, v in zip(self.names, self.m, self.v):
            out[f"m/{n}"] = m.cpu().numpy()
            out[f"v/{n}"] = v.cpu().numpy()
        return out

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for i, n in enumerate(self.names):
            self.m[i].copy_(torch.from_numpy(np.asarray(state[f"m/{n}"])))
            self.v[i].copy_(torch.from_numpy(np.asarray(state[f"v/{n}"])))


def make_optimizer(kind: str, names, shapes, beta1=0.9, beta2=0.999, eps=1e-8, device="cpu",
                   state_device=None) -> SGD:
    if kind == "sgd":
        return SGD(names)
    if kind == "adam":
        return Adam(names, shapes, beta1, beta2, eps, device, state_device)
    raise ValueError(f"unknown optimizer {kind!r}")

