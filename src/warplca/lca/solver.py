"""The Locally Competitive Algorithm (Rozell et al. 2008) for convolutional sparse coding.

Forward-Euler LCA with η = 1/τ, in the reconstruct-then-encode form (two convolutions a step,
exact at the borders)::

    a = T_λ(u)
    u ← u + η · ( Φᵀ(x − Φa) + a − u )

started from u₀ = 0 (cold) or a given state (warm start). The dynamics minimise the per-image
energy E(a) = ½‖x − Φa‖² + Σ P_λ(a); the trace records it, ℓ0 and the MSE after every step without
host syncs. The solver runs in the input's dtype with any enclosing ``torch.autocast`` switched off:
bf16 states would change the fixed points and the reported energies.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from warplca.lca import thresholds
from warplca.lca.dictionary import ConvDictionary, stable_tau
from warplca.lca.operator import Operator
from warplca.lca.thresholds import Threshold, count_active, get_threshold
from warplca.settings import Annotated, Doc, Ge, Gt, Lt, OneOf, checked, declared

TRACE_KEYS = ("energy", "l0", "mse")


@dataclass
class LCAResult:
    """Outcome of an LCA run: final states ``u`` (B, K, H', W'), activations ``a`` = T_λ(u), the
    reconstruction ``recon`` = Φa (B, C, H, W) in the coded space, the steps run ``iters`` (fewer when
    the tolerance stopped it), ``tau`` and the final per-image ``energy`` (B,). ``trace`` (None unless
    asked for) holds ``energy``, ``l0`` (active count) and ``mse`` (per pixel), each (iters + 1, B):
    entry k is the value after k steps.
    """

    u: Tensor
    a: Tensor
    recon: Tensor
    trace: dict[str, Tensor] | None
    iters: int
    tau: float
    energy: Tensor | None = field(repr=False, default=None)


class LCA:
    """Convolutional LCA solver over a :class:`ConvDictionary`.

    Args:
        dictionary: the atoms Φ.
        threshold: ``hard`` (default), ``soft``, ``cel0`` or ``half`` (see :mod:`.thresholds`).
        lam: threshold level λ ≥ 0.
        tau: time constant τ (η = 1/τ) or ``"auto"`` (τ = L = ‖Φ‖²_op). τ ≤ L/2 is unstable and refused;
            L/2 < τ < L is allowed but gives no energy-descent guarantee.
        iters: default number of steps.
        nonneg, theta: non-negative activations; θ of the ``cel0`` threshold.
        tol: optional early stop when max over the batch of ‖Δu‖/‖u‖ < tol (checked every
            ``check_every`` steps: the only host syncs in the loop).
        backend: ``polyphase`` (fast, default) or ``direct`` (the textbook reference); both exact.
        compile: run the Euler step through ``torch.compile`` (worth it on GPUs) when no trace, tolerance
            or gradient is asked for; warns and runs eagerly where it fails.
    """

    @checked
    def __init__(self, dictionary: ConvDictionary,
                 threshold: Annotated[str, OneOf(thresholds.THRESHOLDS, "threshold")] = "hard",
                 lam: Annotated[float, Ge(0), Doc("the threshold λ, in normalised pixel units")] = 0.2,
                 tau: Annotated[float | Literal["auto"], Gt(0),
                                Doc("τ = ‖Φ‖²_op with auto, the largest step with energy descent")] = "auto",
                 iters: Annotated[int, Ge(0), Doc("the inference budget, cold LCA's reference T")] = 1000,
                 nonneg: Annotated[bool, Doc("non-negative activations")] = False,
                 theta: Annotated[float, Gt(0), Lt(1), Doc("θ of the cel0 threshold")] = 0.5,
                 tol: Annotated[float | None, Gt(0), Doc("early stop on max ‖Δu‖/‖u‖ (null: never)")] = None,
                 check_every: Annotated[int, Ge(1), Doc("steps between tolerance checks")] = 10,
                 backend: Literal["polyphase", "direct"] = "polyphase",
                 compile: Annotated[bool, Doc("torch.compile the Euler step (GPU)")] = False) -> None:
        self.dictionary = dictionary
        self.threshold: Threshold = get_threshold(threshold, lam, nonneg, theta)
        self.tau_setting, self.iters, self.tol = tau, iters, tol
        self.check_every, self.backend, self.compile = check_every, backend, compile
        if tau != "auto":  # fail early on a clearly unstable τ; the exact check runs at call time
            size = max(32, 4 * dictionary.kernel_size)
            self.check_tau(float(tau), size, size, warn=False)

    @property
    def lam(self) -> float:
        return self.threshold.lam

    def settings(self) -> dict[str, Any]:
        """Every setting of the solver (:data:`SETTINGS`) as plain values (saved in bundles, manifests)."""
        t = self.threshold
        values = {"threshold": t.name, "lam": t.lam, "tau": self.tau_setting, "nonneg": t.nonneg,
                  "theta": t.theta}
        return {name: values[name] if name in values else getattr(self, name) for name in SETTINGS}

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"LCA({body})"

    def check_tau(self, tau: float, height: int, width: int, warn: bool = True) -> None:
        """Refuse τ ≤ L/2 (η ≥ 2/L diverges); warn when τ < L (no energy-descent guarantee)."""
        lip = self.dictionary.operator_norm(height, width)  # L = ‖Φ‖²_op, cached
        if tau <= lip / 2:
            raise ValueError(
                f"tau={tau:g} is unstable for this dictionary: LCA needs η = 1/τ < 2/L, i.e. τ > L/2 = "
                f"{lip / 2:.4g} (L = ‖Φ‖²_op = {lip:.4g} on {height}×{width} images); use tau='auto' "
                f"(τ = L) or a larger τ")
        if warn and tau < lip:
            warnings.warn(f"tau={tau:g} < L = {lip:.4g}: stable but the energy may not decrease "
                          f"monotonically; tau='auto' gives τ = L", stacklevel=3)

    def resolve_tau(self, height: int, width: int) -> float:
        """The τ used for H×W images (computes L for ``auto``)."""
        if self.tau_setting == "auto":
            return stable_tau(self.dictionary.operator_norm(height, width))
        return float(self.tau_setting)

    def _check_input(self, x: Tensor, u0: Tensor | None) -> None:
        d = self.dictionary
        if not isinstance(x, Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must have shape (B, C, H, W) (rank 4), got rank {x.dim()} {tuple(x.shape)}")
        if x.shape[1] != d.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels but the dictionary expects {d.in_channels}")
        if x.dtype != d.weight.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the dictionary has {d.weight.dtype}; "
                             f"convert one of them (e.g. x.to({d.weight.dtype}))")
        if x.device != d.weight.device:
            raise ValueError(f"x is on {x.device} but the dictionary is on {d.weight.device}")
        if x.numel() == 0:
            raise ValueError(f"x is empty: {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or Inf values")
        if u0 is not None:
            self._check_codes(x, u0, "u0")

    def _check_codes(self, x: Tensor, t: Tensor, name: str) -> None:
        """Codes or states for images ``x``: shape (B, K, ⌈H/s⌉, ⌈W/s⌉), x's dtype and device, finite."""
        expected = (x.shape[0], *self.dictionary.code_shape(*x.shape[-2:]))
        if not isinstance(t, Tensor) or tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} (B, K, ⌈H/s⌉, ⌈W/s⌉), got "
                             f"{tuple(getattr(t, 'shape', ())) or type(t).__name__}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must match x in dtype and device ({x.dtype}, {x.device}), got "
                             f"({t.dtype}, {t.device})")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf values")

    def __call__(self, x: Tensor, iters: int | None = None, u0: Tensor | None = None, trace: bool = False,
                 grad: bool = False) -> LCAResult:
        """Run LCA on images ``x`` (B, C, H, W) in the coded space for ``iters`` steps (default: the
        constructor's) from ``u0`` (zeros when None); ``trace`` records energy, ℓ0 and MSE after every
        step, ``grad`` keeps the autograd graph (for unrolled training)."""
        self._check_input(x, u0)
        iters = self.iters if iters is None else iters
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters must be an integer ≥ 0, got {iters!r}")
        height, width = x.shape[-2:]
        tau = self.resolve_tau(height, width)
        if self.tau_setting != "auto":
            self.check_tau(tau, height, width)
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, torch.autocast(device_type=x.device.type, enabled=False):
            return self._run(x, iters, u0, trace, tau, grad)

    def _run(self, x: Tensor, iters: int, u0: Tensor | None, trace: bool, tau: float,
             grad: bool) -> LCAResult:
        thr, batch, numel, eta = self.threshold, x.shape[0], x[0].numel(), 1.0 / tau
        op = self.dictionary.operator(x.shape[-2], x.shape[-1], self.backend)  # no graph unless grad
        xt = op.pixels(x)
        # States live on the operator's code grid, in its memory layout.
        u = x.new_zeros((batch, *op.grid_shape)) if u0 is None else op.to_grid(u0)
        u = u.clone(memory_format=op.layout) if u is u0 else u.contiguous(memory_format=op.layout)
        record = torch.empty((iters + 1, 3, batch), dtype=x.dtype, device=x.device) if trace else None
        check = self.tol is not None
        steps = iters
        if self.compile and record is None and not check and not grad:
            compiled = _run_compiled(u, xt, op, thr, eta, iters)
            if compiled is not None:
                u, iters = compiled, 0  # the loop below is done
        for step in range(iters):
            a = thr(u)
            resid = xt - op.decode(a)
            if record is not None:
                _record(record[step], resid, a, thr, numel)
            drive = op.encode(resid) + a if grad else op.encode(resid).add_(a)  # Φᵀ(x − Φa) + a
            # max ‖Δu‖/‖u‖ < tol: a host sync, only every check_every steps
            stop = check and (step + 1) % self.check_every == 0 and float(
                (image_norms(drive - u) * eta / image_norms(u).clamp_min(1e-12)).max()) < self.tol
            u = torch.lerp(u, drive, eta) if grad else u.lerp_(drive, eta)  # u + η(drive − u), fused
            if stop:
                steps = step + 1
                break
        a = thr(u)
        recon_t = op.decode(a)
        energy = 0.5 * image_norms(xt - recon_t).square() + thr.penalty_sum(a)
        traces = None
        if record is not None:
            _record(record[steps], xt - recon_t, a, thr, numel)
            traces = {key: record[: steps + 1, i] for i, key in enumerate(TRACE_KEYS)}
        return LCAResult(u=op.from_grid(u), a=op.from_grid(a), recon=op.image(recon_t), trace=traces,
                         iters=steps, tau=tau, energy=energy)

    def energy(self, x: Tensor, a: Tensor) -> Tensor:
        """Per-image energy ½‖x − Φa‖² + Σ P_λ(a): the function the trace reports."""
        self._check_input(x, None)
        self._check_codes(x, a, "a")
        with torch.no_grad():
            op = self.dictionary.operator(x.shape[-2], x.shape[-1], self.backend)
            resid = op.pixels(x) - op.decode(op.to_grid(a))
            return 0.5 * image_norms(resid).square() + self.threshold.penalty_sum(a)

    def states_to_codes(self, u: Tensor) -> Tensor:
        """Activations T_λ(u) of given states."""
        return self.threshold(u)


#: the names of the solver's settings (everything but the dictionary), declared once by ``LCA.__init__``
SETTINGS: tuple[str, ...] = tuple(name for name in declared(LCA) if name != "dictionary")


def _euler_step(u: Tensor, xt: Tensor, op: Operator, thr: Threshold, eta: float) -> Tensor:
    """One LCA step u + η(Φᵀ(x − Φa) + a − u), a = T_λ(u), out of place (the compiled form)."""
    a = thr(u)
    drive = op.encode(xt - op.decode(a)) + a
    return u + eta * (drive - u)


_COMPILED: dict[str, Any] = {}


def _compile_failed(exc: BaseException) -> None:
    _COMPILED["failed"] = True
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    warnings.warn(f"LCA(compile=True): torch.compile is not available here ({type(exc).__name__}: {msg}); "
                  f"running the solver eagerly", RuntimeWarning, stacklevel=4)


def _run_compiled(u: Tensor, xt: Tensor, op: Operator, thr: Threshold, eta: float,
                  iters: int) -> Tensor | None:
    """``iters`` steps of ``torch.compile(_euler_step)`` (created once per process); None once compilation
    has failed. If the first call fails to compile, warn once and finish eagerly."""
    if _COMPILED.get("failed"):
        return None
    if "fn" not in _COMPILED:
        try:
            _COMPILED["fn"] = torch.compile(_euler_step)
        except Exception as exc:  # no compiler support in this build / platform
            _compile_failed(exc)
            return None
    fn: Callable[..., Tensor] = _COMPILED["fn"]
    if iters:
        try:
            u = fn(u, xt, op, thr, eta)
        except Exception as exc:  # compilation happens on the first call
            _compile_failed(exc)
            fn = _euler_step
            u = fn(u, xt, op, thr, eta)
    for _ in range(iters - 1):
        u = fn(u, xt, op, thr, eta)
    return u


def image_norms(t: Tensor) -> Tensor:
    """Per-sample ℓ2 norms over all but the batch dimension, for any memory layout (no copy)."""
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())))


def _record(slot: Tensor, resid: Tensor, a: Tensor, thr: Threshold, numel: int) -> None:
    """Write energy, ℓ0 and MSE of one step into ``slot`` (3, B) on the device (no host sync)."""
    sq = image_norms(resid).square()
    l0 = count_active(a)  # the ℓ0 penalty reuses the count
    penalty = (0.5 * thr.lam * thr.lam) * l0 if thr.name == "hard" and not thr.nonneg else thr.penalty_sum(a)
    slot[0] = 0.5 * sq + penalty
    slot[1] = l0
    slot[2] = sq / numel
