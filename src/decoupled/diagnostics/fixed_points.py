r"""Where Adam + L2, SGD + L2, AdamW and AdamW + CWD converge on a convex problem, against
exact solvers.

Theory (SCIENCE.md §5):

* Adam + L2 and SGD + L2, when they converge, stop where the gradient of
  ``F(θ) = f(θ) + (λ/2)‖θ‖²`` vanishes — the minimizer of the L2-regularized problem, which an
  exact solver finds too (Loshchilov & Hutter 2019, arXiv 1711.05101, §2).
* Full-batch AdamW (torch's "lr" convention, non-increasing lr with Σγ_t = ∞, β1 ≤ β2 < 1)
  converges to a KKT point of ``min f(θ) s.t. ‖θ‖∞ ≤ 1/λ`` (Xie & Li, "Implicit Bias of AdamW:
  ℓ∞ Norm Constrained Optimization", ICML 2024, arXiv 2404.04454): ‖θ‖∞ ≤ 1/λ and
  ``⟨−λθ, ∇f(θ)⟩ = ‖∇f(θ)‖₁`` — every coordinate either has zero gradient or sits on the
  bound, pushed outward by its gradient. For convex f it is the constrained minimizer.
* AdamW with cautious weight decay (CWD; Chen, Li, Liang et al., arXiv 2510.12402) decays a
  coordinate only while the update moves it toward 0 as well; the paper shows that it keeps
  the stationary points of f itself (no regularized or constrained problem replaces f). Where
  f has a minimizer, CWD converges to it (``tests/diagnostics/test_fixed_points.py`` checks it
  on a least-squares problem); on the separable data below f has none, so CWD keeps
  descending f, past the ℓ∞ ball that stops AdamW.

The problem: logistic regression on scikit-learn's bundled breast-cancer data (569 examples,
30 features standardized to mean 0 and variance 1, plus a constant feature for the
intercept), full batch, float64. f is the mean log-loss. The intercept is part of θ and is
regularized like the other weights: the optimizers' L2 term adds λθ to the whole gradient,
which is exactly the gradient of (λ/2)‖θ‖² over all of θ, and AdamW's bound then applies to
every coordinate — so the exact problems below are the ones the optimizers solve.

The data are linearly separable: f alone has no minimizer (‖θ‖ → ∞ as f → 0), so any
λ > 0 makes AdamW's constraint active. λ = 1 puts 18 of the 31 coordinates on the bound.

The schedule: ``γ_t = γ_0/(1 + t/500)``, non-increasing with Σγ_t → ∞ as the theorem asks,
times a linear cool-down to 0 over the second half of the run, which removes the oscillation
that Adam keeps around its fixed point at any positive lr (its steps have length ≈ γ even
as the gradient vanishes). Adam uses β2 = 0.99: with 0.999 the second moment lags a thousand
steps behind the shrinking gradients and the run would have to be several times longer.
The gradient ∇f = Xᵀ(σ(Xθ) − y)/n is written out rather than taken by autograd, which costs
ten times more on a problem this small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

import decoupled

WEIGHT_DECAY = 1.0
STEPS = 20_000
#: A run "ends at" an exact solution θ* when ‖θ − θ*‖/‖θ*‖ is below this. Far looser than the
#: solvers' precision (~1e-13), than what Adam/SGD + L2 reach (< 1e-10 at the default steps)
#: and than AdamW's ~1e-3 (its optimum is non-smooth: it gets there more slowly); yet about
#: 90× smaller than the 0.92 separating the L2 optimum from the ℓ∞ one at the default λ = 1,
#: so it cannot mistake one for the other.
DISTANCE_TOLERANCE = 1e-2
#: AdamW is at a KKT point of the ℓ∞ problem when |KKT gap| is below this. The gap is relative
#: (in [0, 2] inside the ball): the default run reaches ~2e-5, 2000 steps 0.03, 200 steps 0.59.
KKT_TOLERANCE = 1e-3
#: ‖θ‖∞·λ within this of 1 counts as on the boundary of the ℓ∞ ball (the sentence then gives
#: the measured precision); below 1 − it is inside, above 1 + it outside: infeasible, so not
#: converged. Equal to KKT_TOLERANCE because a coordinate past the bound by δ (relative)
#: shifts the KKT gap by at most δ: a looser bound would let the gap test pass an infeasible θ.
BOUNDARY_TOLERANCE = 1e-3
DECAY_STEPS = 500  # γ_t = γ_0 / (1 + t/500) · cool-down
#: The most the decay factor may multiply θ by (see decay_growth). Squares of θ enter the
#: norms of the distances, and float64 squares overflow above ~1.3e154: 1e150 leaves room for
#: θ's starting scale (γ_0) and the √31 of the norm.
MAX_DECAY_GROWTH = 1e150
#: (label, optimizer key, γ_0); SGD's γ_0 < 2/L (L ≈ 4.3 here)
OPTIMIZERS = (
    ("Adam + L2", "adam", 0.05),
    ("SGD + L2", "sgd", 0.3),
    ("AdamW", "adamw", 0.05),
    ("AdamW + CWD", "adamw-cautious", 0.05),
)
CAUTIOUS = "AdamW + CWD"
_CLASSES = {
    "adam": decoupled.Adam,
    "sgd": decoupled.SGD,
    "adamw": decoupled.AdamW,
    "adamw-cautious": partial(decoupled.AdamW, cautious=True),
}


def load_problem() -> tuple[np.ndarray, np.ndarray]:
    """(X, y): standardized breast-cancer features with a constant column, labels in {0, 1}."""
    from sklearn.datasets import load_breast_cancer

    features, labels = load_breast_cancer(return_X_y=True)
    features = (features - features.mean(0)) / features.std(0)
    return np.hstack([features, np.ones((len(features), 1))]), labels.astype(np.float64)


def log_loss_and_gradient(theta: np.ndarray, X: np.ndarray, y: np.ndarray):
    """f(θ) = mean(log(1 + e^z) − y·z), z = Xθ, and ∇f = Xᵀ(σ(z) − y)/n, overflow-free."""
    z = X @ theta
    loss = np.mean(np.logaddexp(0.0, z) - y * z)
    probability = 0.5 * (1 + np.tanh(z / 2))  # σ(z) without overflow in exp
    return loss, X.T @ (probability - y) / len(y)


def l2_optimum(X, y, weight_decay: float) -> np.ndarray:
    """argmin f(θ) + (λ/2)‖θ‖², by L-BFGS in float64, then Newton steps to machine precision.

    L-BFGS alone stops with a relative gradient of ~1e-9; two or three Newton steps with the
    exact Hessian Xᵀ·diag(σ(z)(1 − σ(z)))·X/n + λI take it to ~1e-16.
    """
    from scipy.optimize import minimize

    def objective(theta):
        loss, grad = log_loss_and_gradient(theta, X, y)
        return loss + weight_decay / 2 * theta @ theta, grad + weight_decay * theta

    options = {"gtol": 1e-13, "ftol": 1e-16, "maxiter": 10_000}
    result = minimize(objective, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B", options=options)
    theta = result.x
    for _ in range(3):
        probability = 0.5 * (1 + np.tanh(X @ theta / 2))
        curvature = probability * (1 - probability) / len(y)
        hessian = X.T @ (X * curvature[:, None]) + weight_decay * np.eye(X.shape[1])
        theta = theta - np.linalg.solve(hessian, objective(theta)[1])
    return theta


def box_optimum(X, y, bound: float) -> np.ndarray:
    """argmin f(θ) subject to ‖θ‖∞ ≤ bound, by L-BFGS-B (box constraints) in float64."""
    from scipy.optimize import minimize

    options = {"gtol": 1e-13, "ftol": 1e-16, "maxiter": 100_000}
    result = minimize(
        lambda theta: log_loss_and_gradient(theta, X, y),
        np.zeros(X.shape[1]),
        jac=True,
        method="L-BFGS-B",
        bounds=[(-bound, bound)] * X.shape[1],
        options=options,
    )
    return result.x


def kkt_gap(theta: np.ndarray, grad: np.ndarray, weight_decay: float) -> float:
    """``(‖∇f‖₁ − ⟨−λθ, ∇f⟩) / ‖∇f‖₁``: 0 at a KKT point of the ℓ∞-constrained problem
    (Xie & Li 2024), ≥ 0 whenever ‖θ‖∞ ≤ 1/λ."""
    l1 = np.abs(grad).sum()
    return float((l1 - (-weight_decay * theta) @ grad) / l1)


@dataclass
class FixedPointRun:
    label: str  # "Adam + L2" | "SGD + L2" | "AdamW" | "AdamW + CWD"
    lr: float  # γ_0
    theta: np.ndarray
    steps: list[int] = field(default_factory=list)
    distance: list[float] = field(default_factory=list)  # ‖θ_t − θ*‖/‖θ*‖, θ* its predicted limit


@dataclass
class FixedPointResult:
    weight_decay: float
    steps: int
    l2_solution: np.ndarray  # exact argmin f + (λ/2)‖θ‖²
    box_solution: np.ndarray  # exact argmin f s.t. ‖θ‖∞ ≤ 1/λ
    runs: dict[str, FixedPointRun]  # the optimizers that converge to a point theory predicts
    X: np.ndarray
    y: np.ndarray
    cautious: FixedPointRun | None = None  # AdamW + CWD: no such point here (module docstring)

    @property
    def all_runs(self) -> dict[str, FixedPointRun]:
        return {**self.runs, **({CAUTIOUS: self.cautious} if self.cautious else {})}

    @property
    def bound(self) -> float:
        return 1 / self.weight_decay

    def relative_distance(self, label: str, target: np.ndarray) -> float:
        theta = self.all_runs[label].theta
        return float(np.linalg.norm(theta - target) / np.linalg.norm(target))

    def active_coordinates(self) -> int:
        """Coordinates of the exact constrained optimum on the bound ±1/λ."""
        return int(np.sum(np.abs(self.box_solution) >= self.bound * (1 - 1e-8)))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per optimizer: distances to both exact solutions, ‖θ‖∞·λ, the KKT gap, the loss,
        and ‖∇f‖ (f alone: 0 only at a stationary point of the unregularized loss)."""
        rows = {}
        for label, run in self.all_runs.items():
            loss, grad = log_loss_and_gradient(run.theta, self.X, self.y)
            rows[label] = {
                "to_l2_optimum": self.relative_distance(label, self.l2_solution),
                "to_box_optimum": self.relative_distance(label, self.box_solution),
                "sup_norm_times_lambda": float(np.abs(run.theta).max() * self.weight_decay),
                "kkt_gap": kkt_gap(run.theta, grad, self.weight_decay),
                "log_loss": float(loss),
                "grad_norm": float(np.linalg.norm(grad)),
            }
        return rows


def train(
    X,
    y,
    optimizer: str,
    lr: float,
    weight_decay: float,
    steps: int,
    target: np.ndarray,
    records: int = 200,
) -> FixedPointRun:
    """Full-batch training from θ = 0 with the schedule of the module docstring; records the
    distance to ``target`` (the limit theory predicts) at about ``records`` log-spaced steps."""
    inputs, labels = torch.from_numpy(X), torch.from_numpy(y)
    theta = torch.zeros(X.shape[1], dtype=torch.float64)
    extra = {"betas": (0.9, 0.99)} if optimizer.startswith("adam") else {}
    opt = _CLASSES[optimizer]([theta], lr=lr, weight_decay=weight_decay, **extra)
    label = next(name for name, key, _ in OPTIMIZERS if key == optimizer)
    run = FixedPointRun(label, lr, theta.numpy())
    target_norm = np.linalg.norm(target)
    record_at = set(np.unique(np.geomspace(1, steps, records).round().astype(int)).tolist())
    for step in range(steps):
        opt.param_groups[0]["lr"] = lr * float(learning_rate_factor(step, steps))
        theta.grad = inputs.T @ (torch.sigmoid(inputs @ theta) - labels) / len(labels)
        opt.step()
        if step + 1 in record_at:
            run.steps.append(step + 1)
            run.distance.append(float(np.linalg.norm(theta.numpy() - target) / target_norm))
    run.theta = theta.numpy().copy()
    return run


def learning_rate_factor(step, steps: int):
    """γ_t/γ_0 = 1/(1 + t/500), times a linear cool-down to 0 over the second half (``step``
    a number or an array of them)."""
    return 1 / (1 + step / DECAY_STEPS) * np.minimum(1.0, (steps - step) / (steps / 2))


def decay_growth(lr: float, weight_decay: float, steps: int) -> float:
    """The largest factor by which the decay term alone multiplies θ during a run: the product
    of |1 − γ_t·λ| over the steps where it exceeds 1, i.e. where γ_t·λ > 2 (γ_t = lr times
    learning_rate_factor). Both SGD + L2 (θ ← θ − γ_t(∇f + λθ)) and AdamW (θ ← θ(1 − γ_t·λ)
    − γ_t·u_t) apply this factor; ∇f and Adam's u_t are bounded, so the run's iterates reach
    about γ_0 times it. γ_t·λ is non-increasing, so these steps come first and the product
    over them is the peak. Exceeding MAX_DECAY_GROWTH returns inf without summing the rest.
    """
    log_growth, start, chunk = 0.0, 0, 100_000
    with np.errstate(over="ignore"):  # an overflowing rate is inf: infinite growth
        while start < steps and log_growth <= math.log(MAX_DECAY_GROWTH):
            step = np.arange(start, min(steps, start + chunk), dtype=np.float64)
            rate = lr * weight_decay * learning_rate_factor(step, steps)
            growing = rate[rate > 2]
            log_growth += float(np.log(growing - 1).sum())
            if len(growing) < len(rate):
                break
            start += chunk
    return math.exp(log_growth) if log_growth <= math.log(MAX_DECAY_GROWTH) else math.inf


def check_weight_decay(weight_decay: float, steps: int = STEPS) -> None:
    """Raise ValueError naming λ unless every number of the run stays finite: λ > 0 with a
    finite bound 1/λ, and a decay factor that grows θ by at most MAX_DECAY_GROWTH for every
    optimizer (decay_growth). Adam + L2's steps are normalized, ≈ γ_t whatever λ, so only
    SGD + L2 and AdamW can overflow; γ_0·λ ≤ 2 never grows θ."""
    if not (math.isfinite(weight_decay) and weight_decay > 0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be > 0)")
    if not math.isfinite(1 / weight_decay):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay} (the bound 1/λ of AdamW's ℓ∞ ball "
            "overflows float64)"
        )
    for label, key, lr in OPTIMIZERS:
        if key != "adam" and decay_growth(lr, weight_decay, steps) > MAX_DECAY_GROWTH:
            raise ValueError(
                f"Invalid weight_decay value: {weight_decay} ({label} at γ_0 = {lr:g}: its "
                f"decay factor |1 − γ_t·λ| would multiply θ by more than "
                f"{MAX_DECAY_GROWTH:.0e} and overflow float64; λ ≤ 2/γ_0 = {2 / lr:.3g} "
                "never grows it)"
            )


def fixed_points(weight_decay: float = WEIGHT_DECAY, steps: int = STEPS) -> FixedPointResult:
    """Train the three optimizers to convergence and solve both problems exactly; λ must
    pass check_weight_decay."""
    check_weight_decay(weight_decay, steps)
    X, y = load_problem()
    l2_solution = l2_optimum(X, y, weight_decay)
    box_solution = box_optimum(X, y, 1 / weight_decay)
    runs = {}
    for label, key, lr in OPTIMIZERS:
        # CWD's distance is recorded from the ℓ∞ optimum too: it leaves it (module docstring)
        target = box_solution if key.startswith("adamw") else l2_solution
        runs[label] = train(X, y, key, lr, weight_decay, steps, target)
    cautious = runs.pop(CAUTIOUS)
    return FixedPointResult(
        weight_decay, steps, l2_solution, box_solution, runs, X, y, cautious=cautious
    )


def unregularized_sup_norm(X, y, iterations: int = 200) -> float:
    """‖θ‖∞ that L-BFGS reaches on f alone: large, as f has no minimizer on separable data."""
    from scipy.optimize import minimize

    result = minimize(
        lambda theta: log_loss_and_gradient(theta, X, y),
        np.zeros(X.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": iterations},
    )
    return float(np.abs(result.x).max())


def format_fixed_points(result: FixedPointResult) -> str:
    """The report `decoupled inspect fixed-points` prints."""
    lam = result.weight_decay
    unregularized = unregularized_sup_norm(result.X, result.y)
    lines = [
        "Fixed points on a convex problem: full-batch logistic regression, breast-cancer data",
        f"({len(result.y)} examples, {result.X.shape[1] - 1} standardized features + intercept, "
        f"float64), λ = {lam:g} for all, {result.steps} steps",
        f"lr γ_t = γ_0/(1 + t/{DECAY_STEPS}), cooled linearly to 0 over the second half; "
        "Adam betas (0.9, 0.99)",
        "",
        f"exact L2 optimum    argmin f + (λ/2)‖θ‖²        (L-BFGS + Newton)  "
        f"‖θ‖∞ = {np.abs(result.l2_solution).max():.4g}",
        f"exact ℓ∞ optimum    argmin f s.t. ‖θ‖∞ ≤ 1/λ = {result.bound:g}  (L-BFGS-B)  "
        f"{result.active_coordinates()} of {len(result.box_solution)} coordinates on the bound",
        f"f alone             L-BFGS reaches ‖θ‖∞ = {unregularized:.3g} (separable data: no "
        "minimizer), so the constraint is active",
        "",
        f"{'optimizer':<11}{'γ_0':>6}{'→ L2 optimum':>15}{'→ ℓ∞ optimum':>15}"
        f"{'‖θ‖∞·λ':>10}{'KKT gap':>11}{'log-loss':>10}{'‖∇f‖':>10}",
    ]
    for label, row in result.summary().items():
        lines.append(
            f"{label:<11}{result.all_runs[label].lr:>6g}{row['to_l2_optimum']:>15.2e}"
            f"{row['to_box_optimum']:>15.2e}{row['sup_norm_times_lambda']:>10.6f}"
            f"{row['kkt_gap']:>11.2e}{row['log_loss']:>10.4f}{row['grad_norm']:>10.2e}"
        )
    lines += [
        "",
        "→ L2 / ℓ∞ optimum: relative distance ‖θ − θ*‖/‖θ*‖ to that exact solution.",
        "KKT gap: (‖∇f‖₁ − ⟨−λθ, ∇f⟩)/‖∇f‖₁, 0 at the ℓ∞ optimum (Xie & Li's KKT equality).",
        f"Converged: distance < {DISTANCE_TOLERANCE:g}, and for AdamW KKT gap < "
        f"{KKT_TOLERANCE:g} and ‖θ‖∞·λ ≤ 1 + {BOUNDARY_TOLERANCE:g}; on the boundary: "
        f"|‖θ‖∞·λ − 1| ≤ {BOUNDARY_TOLERANCE:g}.",
        "",
        *conclusions(result),
    ]
    return "\n".join(lines)


def ball_position(sup_norm_times_lambda: float) -> str:
    """Where θ is relative to the ball ‖θ‖∞ ≤ 1/λ, from ‖θ‖∞·λ, with the precision measured:
    "on the boundary of the ℓ∞ ball ‖θ‖∞ ≤ 1/λ (to 1e-5)" for 1.000009, "inside ... (‖θ‖∞·λ =
    0.534)" for 0.534, "outside ..." above 1 + BOUNDARY_TOLERANCE."""
    ball = "the ℓ∞ ball ‖θ‖∞ ≤ 1/λ"
    offset = sup_norm_times_lambda - 1
    if offset == 0:
        return f"exactly on the boundary of {ball}"
    if abs(offset) <= BOUNDARY_TOLERANCE:
        return f"on the boundary of {ball} (to {_e(10 ** math.ceil(math.log10(abs(offset))))})"
    where = "inside" if offset < 0 else "outside"
    return f"{where} {ball} (‖θ‖∞·λ = {sup_norm_times_lambda:.4g})"


def _e(value: float, digits: int = 0) -> str:
    """Scientific notation without the exponent's leading zero: 1.1e-3, 1e-5."""
    mantissa, exponent = f"{value:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def cautious_conclusion(summary: dict[str, dict[str, float]]) -> str:
    """Where AdamW + CWD ends against AdamW and Adam + L2, decided by the numbers: past the
    ℓ∞ ball with a lower loss and a far smaller ‖∇f‖ than both, it is still descending f."""
    row, adamw, adam = summary[CAUTIOUS], summary["AdamW"], summary["Adam + L2"]
    position = ball_position(row["sup_norm_times_lambda"])
    numbers = (
        f"log-loss {row['log_loss']:.4f} (AdamW {adamw['log_loss']:.4f}, Adam + L2 "
        f"{adam['log_loss']:.4f}), ‖∇f‖ = {_e(row['grad_norm'], 1)} (AdamW "
        f"{_e(adamw['grad_norm'], 1)}, Adam + L2 {_e(adam['grad_norm'], 1)})"
    )
    descending = (
        row["sup_norm_times_lambda"] > 1 + BOUNDARY_TOLERANCE
        and row["log_loss"] < min(adamw["log_loss"], adam["log_loss"])
        and row["grad_norm"] < min(adamw["grad_norm"], adam["grad_norm"]) / 10
    )
    if descending:
        return (
            f"{CAUTIOUS} ends {position}, {numbers}: it keeps descending f, which has no "
            "minimizer on these separable data; cautious decay keeps f's stationary points "
            "(arXiv 2510.12402), so it stops at neither regularized optimum."
        )
    return f"{CAUTIOUS} ends {position}, {numbers}."


def conclusions(result: FixedPointResult) -> list[str]:
    """One sentence per optimizer, each decided by its measured numbers and the tolerances
    DISTANCE_TOLERANCE, KKT_TOLERANCE and BOUNDARY_TOLERANCE — "not converged" when they miss."""
    lines, all_converged = [], True
    summary = result.summary()
    for label, row in summary.items():
        not_converged = f"{label} has not converged after {result.steps} steps"
        if label == CAUTIOUS:
            lines.append(cautious_conclusion(summary))
            continue  # f has no minimizer here: there is no point for CWD to converge to
        if label == "AdamW":
            distance, gap = row["to_box_optimum"], row["kkt_gap"]
            position = ball_position(row["sup_norm_times_lambda"])
            converged = (
                distance < DISTANCE_TOLERANCE
                and abs(gap) < KKT_TOLERANCE
                and row["sup_norm_times_lambda"] <= 1 + BOUNDARY_TOLERANCE
            )
            if converged:
                lines.append(
                    f"{label} ends {position}, at the ℓ∞-constrained optimum (distance "
                    f"{_e(distance, 1)}, KKT gap {_e(gap, 1)}; Xie & Li 2024)."
                )
            else:
                lines.append(
                    f"{not_converged}: distance to the ℓ∞ optimum {distance:.2g}, KKT gap "
                    f"{gap:.2g}, {position}."
                )
        else:
            distance = row["to_l2_optimum"]
            converged = distance < DISTANCE_TOLERANCE
            if converged:
                lines.append(f"{label} ends at the L2 optimum (distance {_e(distance, 1)}).")
            else:
                lines.append(f"{not_converged}: distance to the L2 optimum {distance:.2g}.")
        all_converged = all_converged and converged
    if all_converged:
        lines.append(
            "The same λ, two different problems solved: the L2-regularized one by Adam + L2 "
            "and SGD + L2, the ℓ∞-constrained one by AdamW."
        )
    return lines
