"""λ-continuation: LCA with the threshold annealed from a large λ down to the target λ.

With the hard threshold cold LCA settles in the first minimum it meets. A large threshold first
activates only the strongest atoms; lowering it geometrically admits weaker ones, ending at the target
λ in a lower, sparser minimum for the same number of steps. WARP-LCA can imitate these states
(``targets.solver=continuation``); cold LCA at the target λ stays the reports' baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from warplca.lca.solver import LCA, LCAResult
from warplca.settings import Annotated, Checked, Doc, Ge, Le


@dataclass(frozen=True)
class Continuation(Checked):
    """A geometric λ schedule: ``stages`` annealing stages from ``start_factor``·λ down to λ over the
    fraction ``anneal_frac`` of the iterations; the rest run at λ."""

    start_factor: Annotated[float, Ge(1), Doc("the first stage's λ factor")] = 4.0
    stages: Annotated[int, Ge(1)] = 10
    anneal_frac: Annotated[float, Ge(0), Le(1)] = 0.7

    def schedule(self, lam: float, iters: int) -> list[tuple[float, int]]:
        """(λ_i, steps_i) pairs summing to ``iters`` steps and ending at λ."""
        per_stage = int(self.anneal_frac * iters) // self.stages
        steps: list[tuple[float, int]] = []
        if per_stage > 0:
            for j in range(self.stages):
                frac = 1.0 - j / (self.stages - 1) if self.stages > 1 else 0.0
                steps.append((lam * self.start_factor ** frac, per_stage))
        steps.append((lam, iters - per_stage * len(steps)))
        return steps


def solve_continuation(lca: LCA, x: Tensor, iters: int, schedule: Continuation | None = None,
                       u0: Tensor | None = None) -> LCAResult:
    """Run ``iters`` LCA steps on ``x`` with λ annealed by ``schedule`` down to ``lca``'s λ.

    Every other setting is ``lca``'s; the result's energy is the energy at the target λ.
    """
    schedule = schedule or Continuation()
    settings = {k: v for k, v in lca.settings().items() if k not in ("lam", "iters", "tol")}
    u, stages = u0, schedule.schedule(lca.lam, iters)
    for lam, steps in stages[:-1]:
        u = LCA(lca.dictionary, lam=lam, **settings)(x, iters=steps, u0=u).u
    return lca(x, iters=stages[-1][1], u0=u)
