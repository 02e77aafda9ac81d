"""Where a model's training time goes: :meth:`fastbp.Sequential.profile`'s result."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OpProfile", "Profile"]


@dataclass(frozen=True)
class OpProfile:
    """One op of the model's C plan: a Linear with the activation after it (fused into the
    product), or another layer. Times are wall-clock seconds summed over every call."""

    layers: tuple[int, ...]  # indices of the Sequential's layers this op runs
    name: str  # e.g. "Linear(784, 256) + ReLU"
    forward: float
    grad_input: float  # the input-gradient product (and the activation backward fused into it)
    grad_weights: float  # activation backward, weight and bias gradients, fused SGD update


@dataclass
class Profile:
    """Wall-clock seconds per op and phase, summed over the calls made inside
    ``with model.profile() as prof:``, and how many calls there were. Empty (all zero) until
    the block ends.

    ``forwards`` counts forward passes (training steps' and evaluation's), ``backwards``
    backward passes, ``losses`` training-loss evaluations, ``updates`` optimizer passes over the
    parameters (with plain SGD most of the update runs inside ``grad_weights``),
    ``batch_count`` the batches :meth:`~fastbp.Sequential.fit` copied or checked (their time in
    ``batches``), ``indexed_batch_count`` those of them shuffled but not copied: the first
    Linear's products read their rows of X through the order. A network small enough for the
    fused one-kernel step trains without per-op times: those steps count in
    ``fused_step_count`` and ``fused_steps``.
    """

    ops: tuple[OpProfile, ...] = ()
    loss: float = 0.0
    update: float = 0.0
    batches: float = 0.0
    fused_steps: float = 0.0
    forwards: int = 0
    backwards: int = 0
    losses: int = 0
    updates: int = 0
    batch_count: int = 0
    fused_step_count: int = 0
    indexed_batch_count: int = 0

    def _fill(self, ops: tuple[OpProfile, ...], totals: dict[str, float]) -> None:
        self.ops = ops
        for key, value in totals.items():
            setattr(self, key, value)

    @property
    def total(self) -> float:
        """Seconds accounted for: every op's phases and the per-step work outside them."""
        ops = sum(op.forward + op.grad_input + op.grad_weights for op in self.ops)
        return ops + self.loss + self.update + self.batches + self.fused_steps

    def table(self) -> str:
        """The profile as text: microseconds per call of each phase, and the counts."""

        def per_call(seconds: float, calls: int) -> str:
            """'-' for a phase that never ran (a first layer's input gradient)."""
            return f"{seconds / calls * 1e6:.1f}" if calls and seconds else "-"

        width = max([len(op.name) for op in self.ops] + [len("op")])
        header = f"{'op':<{width}}  {'forward':>9}  {'grad input':>10}  {'grad weights':>12}"
        lines = [f"{'':<{width}}  microseconds per forward / backward pass", header]
        for op in self.ops:
            lines.append(
                f"{op.name:<{width}}  {per_call(op.forward, self.forwards):>9}"
                f"  {per_call(op.grad_input, self.backwards):>10}"
                f"  {per_call(op.grad_weights, self.backwards):>12}"
            )
        lines.append(
            f"loss {per_call(self.loss, self.losses)} us, update "
            f"{per_call(self.update, self.updates)} us, batch copy "
            f"{per_call(self.batches, self.batch_count)} us per call"
        )
        if self.fused_step_count:
            lines.append(
                f"fused small-network steps: {per_call(self.fused_steps, self.fused_step_count)}"
                f" us each ({self.fused_step_count})"
            )
        lines.append(
            f"{self.forwards} forwards, {self.backwards} backwards, {self.updates} updates, "
            f"{self.total * 1e3:.2f} ms in all"
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
