"""Bradley-Terry ratings by maximum likelihood, as Chatbot Arena computes them (FastChat rating_systems.py).

P(a beats b) = 1 / (1 + 10 ** ((R_b - R_a) / 400)). A tie counts as half a win and half a loss. The natural-scale
strengths (log10 odds) are fit by L-BFGS from zero, which keeps their mean at zero (every gradient sums to zero),
then mapped to the Elo scale: rating = 400 * strength + 1000, optionally shifted so that an anchor model has a
fixed rating (the Arena anchors mixtral-8x7b-instruct-v0.1 at 1114 when it is present).

Style control adds per-battle covariates (differences in answer length and markdown counts) to the logit, with an
L2 penalty on all parameters, so that a model's rating no longer pays or earns for its style.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from jvila.eval.battles import Battle, encode

BASE = 10.0
SCALE = 400.0
INIT_RATING = 1000.0
# FastChat's L-BFGS settings: stop at a gradient of 1e-6 or after 100 iterations. Newton steps then finish the
# convergence (_newton_polish).
TOL = 1e-6
MAX_ITER = 100

# (model_a's key, model_b's key) in conv_metadata for answer length, markdown headers, list items and bold spans.
STYLE_KEYS = (("sum_assistant_a_tokens", "sum_assistant_b_tokens"), ("header_count_a", "header_count_b"),
              ("list_count_a", "list_count_b"), ("bold_count_a", "bold_count_b"))
STYLE_REG = 0.5
# The Arena's published scale: when this model is among the rated, every rating shifts so that it sits at 1114.
ARENA_ANCHOR = ("mixtral-8x7b-instruct-v0.1", 1114.0)


def single_threaded_blas():
    """A context in which BLAS runs on one thread. L-BFGS-B's vector operations are tiny (one entry per model);
    a multithreaded OpenBLAS spends more time waking its threads than computing them (a bootstrap of 100 fits
    ran ~15x slower on a busy 2-core machine). Entering it costs milliseconds: wrap loops, not single fits."""
    return threadpool_limits(limits=1, user_api="blas")


def weighted_outcomes(matchups: np.ndarray, outcomes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (model_a, model_b, outcome) triples and how often each occurs: the likelihood only needs these."""
    schedule = np.column_stack([matchups, np.rint(outcomes * 2).astype(matchups.dtype)])
    unique, counts = np.unique(schedule, axis=0, return_counts=True)
    return unique[:, :2], unique[:, 2].astype(np.float64) / 2.0, counts.astype(np.float64)


def _bt_loss_and_grad(strengths, matchups, outcomes, weights, alpha):
    logits = alpha * (strengths[matchups[:, 0]] - strengths[matchups[:, 1]])
    # log p and log(1-p) through logaddexp: no log(0) for lopsided pairs.
    loss = (weights * (outcomes * np.logaddexp(0.0, -logits) + (1.0 - outcomes) * np.logaddexp(0.0, logits))).sum()
    residual = -alpha * weights * (outcomes - 1.0 / (1.0 + np.exp(-logits)))
    grad = np.zeros_like(strengths)
    np.add.at(grad, matchups[:, 0], residual)
    np.add.at(grad, matchups[:, 1], -residual)
    return loss, grad


def fit_bt(matchups: np.ndarray, outcomes: np.ndarray, weights: np.ndarray, num_models: int, *,
           base: float = BASE, tol: float = TOL) -> np.ndarray:
    """Natural-scale strengths (log-`base` odds units) maximising the weighted Bradley-Terry likelihood."""
    alpha = math.log(base)
    result = minimize(_bt_loss_and_grad, np.zeros(num_models), args=(matchups, outcomes, weights, alpha),
                      jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITER, "gtol": tol})
    strengths = result.x

    def hessian(x):
        p = 1.0 / (1.0 + np.exp(-alpha * (x[matchups[:, 0]] - x[matchups[:, 1]])))
        return _pair_hessian(matchups, alpha**2 * weights * p * (1.0 - p), num_models)

    # The likelihood is only defined up to a common shift: the minimum-norm Newton step keeps the mean at zero.
    return _newton_polish(strengths, lambda x: _bt_loss_and_grad(x, matchups, outcomes, weights, alpha)[1], hessian)


def _pair_hessian(matchups: np.ndarray, curvature: np.ndarray, num_models: int) -> np.ndarray:
    """Σ curvature * (e_a - e_b)(e_a - e_b)^T over battles."""
    h = np.zeros((num_models, num_models))
    a, b = matchups[:, 0], matchups[:, 1]
    np.add.at(h, (a, a), curvature)
    np.add.at(h, (b, b), curvature)
    np.add.at(h, (a, b), -curvature)
    np.add.at(h, (b, a), -curvature)
    return h


def _newton_polish(x: np.ndarray, gradient, hessian, steps: int = 4, trust: float = 1e-2) -> np.ndarray:
    """A few Newton steps after L-BFGS, which stops at a gradient of 1e-6 and leaves ratings off by up to ~1e-4
    points; Newton converges quadratically from there to rounding. Only small steps are taken: a large one means
    the maximum is at infinity (a model that never lost), where L-BFGS's answer is kept as FastChat's is."""
    for _ in range(steps):
        step = np.linalg.lstsq(hessian(x), gradient(x), rcond=None)[0]
        if not np.all(np.isfinite(step)) or np.max(np.abs(step)) > trust:
            break
        x = x - step
        if np.max(np.abs(step)) < 1e-13:
            break
    return x


def to_elo_scale(strengths: np.ndarray, models: list[str], *, scale: float = SCALE, init_rating: float = INIT_RATING,
                 anchor: tuple[str, float] | None = None) -> np.ndarray:
    """Natural scale → Elo scale; with `anchor=(model, rating)` every row is shifted so that model has that rating."""
    ratings = strengths * scale + init_rating
    if anchor is not None and anchor[0] in models:
        ratings = ratings + (anchor[1] - ratings[..., [models.index(anchor[0])]])
    return ratings


def bt_ratings(battles: list[Battle], *, base: float = BASE, scale: float = SCALE, init_rating: float = INIT_RATING,
               anchor: tuple[str, float] | None = None) -> dict[str, float]:
    """Each model's Bradley-Terry rating on the Elo scale."""
    if not battles:
        raise ValueError("no battles to rate")
    models, matchups, outcomes = encode(battles)
    pairs, pair_outcomes, weights = weighted_outcomes(matchups, outcomes)
    with single_threaded_blas():
        strengths = fit_bt(pairs, pair_outcomes, weights, len(models), base=base)
    return dict(zip(models, to_elo_scale(strengths, models, scale=scale, init_rating=init_rating,
                                         anchor=anchor).tolist()))


# -------------------------------------------------------------------------------------------- style control


def _style_count(metadata: dict, key: str, where: str) -> float:
    if key not in metadata:
        raise ValueError(f"{where}: conv_metadata has no {key!r} (style control needs it)")
    value = metadata[key]
    values = list(value.values()) if isinstance(value, dict) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: conv_metadata {key!r} must be a count or a dict of counts, got {value!r}")
    return float(sum(values))


def style_features(battles: list[Battle]) -> np.ndarray:
    """(N, 4) standardised style covariates: for length, headers, lists and bold, (a - b) / (a + b + 1), then
    centred and divided by the standard deviation over battles."""
    counts = np.zeros((2, len(battles), len(STYLE_KEYS)))
    for i, battle in enumerate(battles):
        where = f"battle {i + 1} ({battle.model_a} vs {battle.model_b})"
        if battle.conv_metadata is None:
            raise ValueError(f"{where}: no conv_metadata (style control needs it)")
        for j, (key_a, key_b) in enumerate(STYLE_KEYS):
            counts[0, i, j] = _style_count(battle.conv_metadata, key_a, where)
            counts[1, i, j] = _style_count(battle.conv_metadata, key_b, where)
    diff = (counts[0] - counts[1]) / (counts[0] + counts[1] + 1.0)
    std = diff.std(axis=0)
    if np.any(std == 0):
        constant = [STYLE_KEYS[j][0].replace("_a", "") for j in np.flatnonzero(std == 0)]
        raise ValueError(f"style control: {', '.join(constant)} does not vary between battles")
    return (diff - diff.mean(axis=0)) / std


def _contextual_loss_and_grad(params, num_models, matchups, features, outcomes, alpha, reg):
    strengths, coefficients = params[:num_models], params[num_models:]
    logits = alpha * (strengths[matchups[:, 0]] - strengths[matchups[:, 1]]) + features @ coefficients
    # FastChat's penalty is reg/2 * |params|^2 (it halves sklearn's C=1 because it no longer duplicates battles).
    loss = (outcomes * np.logaddexp(0.0, -logits) + (1.0 - outcomes) * np.logaddexp(0.0, logits)).sum()
    loss += 0.5 * reg * params @ params
    error = outcomes - 1.0 / (1.0 + np.exp(-logits))
    grad = reg * params
    np.add.at(grad, matchups[:, 0], -alpha * error)
    np.add.at(grad, matchups[:, 1], alpha * error)
    grad[num_models:] -= features.T @ error
    return loss, grad


def fit_style_controlled_bt(matchups: np.ndarray, features: np.ndarray, outcomes: np.ndarray, num_models: int, *,
                            base: float = BASE, reg: float = STYLE_REG,
                            tol: float = TOL) -> tuple[np.ndarray, np.ndarray]:
    """(strengths, style coefficients) of the L2-penalised Bradley-Terry model with style covariates."""
    alpha = math.log(base)
    args = (num_models, matchups, features, outcomes, alpha, reg)
    result = minimize(_contextual_loss_and_grad, np.zeros(num_models + features.shape[1]), args=args,
                      jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITER, "gtol": tol})

    def hessian(params):
        # The logit is a linear function of params with design row [alpha*(e_a - e_b), features].
        design = np.zeros((len(outcomes), len(params)))
        rows = np.arange(len(outcomes))
        design[rows, matchups[:, 0]] += alpha
        design[rows, matchups[:, 1]] -= alpha
        design[:, num_models:] = features
        p = 1.0 / (1.0 + np.exp(-design @ params))
        return (design * (p * (1.0 - p))[:, None]).T @ design + reg * np.eye(len(params))

    params = _newton_polish(result.x, lambda x: _contextual_loss_and_grad(x, *args)[1], hessian)
    return params[:num_models], params[num_models:]


def style_controlled_ratings(battles: list[Battle], *, scale: float = SCALE, init_rating: float = INIT_RATING,
                             anchor: tuple[str, float] | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Style-controlled ratings on the Elo scale and the fitted style coefficients (length, header, list, bold)."""
    if not battles:
        raise ValueError("no battles to rate")
    models, matchups, outcomes = encode(battles)
    with single_threaded_blas():
        strengths, coefficients = fit_style_controlled_bt(matchups, style_features(battles), outcomes, len(models))
    ratings = to_elo_scale(strengths, models, scale=scale, init_rating=init_rating, anchor=anchor)
    return dict(zip(models, ratings.tolist())), coefficients
