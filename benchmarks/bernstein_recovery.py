"""KL(q || exact posterior) of Bernstein-flow VI (M = 1, 3, 10, 30) against mean-field Gaussian VI on the BF-VI
1-D recovery problems, in one process.

* Bernoulli: y = (1, 1), prior Beta(1.1, 1.1) on pi, inference on logit(pi) (exact posterior Beta(3.1, 1.1));
  the paper's medians: Gaussian 0.0222, M = 1 0.0054, M = 3 0.0039, M = 10 1.6e-4, M = 30 8e-5.
* Cauchy: six points y (scale 1), prior N(0, 1) as in the spec (a unimodal posterior here) and N(0, 3^2)
  (bimodal); the paper's medians (prior N(0, 1)): Gaussian 0.387, M = 1 0.124, M = 3 0.118, M = 10 0.021,
  M = 30 0.0040.

Every family: RMSprop lr 0.01, 3,000 steps of 1,000 draws; KL from 10,000 draws; exact posteriors normalised by
quadrature. Targets (issue 7): Bernoulli M = 10 < 1e-3 with Gaussian near 0.02; Cauchy M = 10 < 0.03.

``--correlated`` adds a 2-D Bayesian linear regression (prior N(0, I), noise N(0, 1), six points, two strongly
correlated columns: posterior correlation -0.94) against its exact Gaussian posterior N(mu, Lambda^-1):
mean-field Gaussian VI, its closed-form optimum 0.5 (sum_i log Lambda_ii - log det Lambda) (the best factorised
q of a Gaussian has precisions diag(Lambda); Bishop 2006, section 10.1.2), mean-field Bernstein flows and the
autoregressive Bernstein flow (M = 10, support (-5, 5)); same training and KL settings.

    python benchmarks/bernstein_recovery.py --seeds 1 [--correlated]
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_bayes.inference.bernstein import BernsteinFlow
from lightning_bayes.inference.bernstein_autoregressive import AutoregressiveBernsteinFlow
from lightning_bayes.inference.mean_field_gaussian import MeanFieldGaussian
from lightning_bayes.inference.reparameterised_vi import ReparameterisedFamily, fit_reparameterised, kl_to_posterior
from arguments import positive_int  # benchmarks/arguments.py

CAUCHY_DATA = torch.tensor([1.2084, -2.7329, 4.1770, 1.9711, -4.2004, -2.3850], dtype=torch.float64)
DEGREES = (1, 3, 10, 30)
Problem = tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], tuple[float, float]]


def logit_beta(t: Tensor, a: float, b: float) -> Tensor:
    beta = torch.distributions.Beta(torch.tensor(a, dtype=t.dtype), torch.tensor(b, dtype=t.dtype))
    return beta.log_prob(torch.sigmoid(t).clamp(1e-12, 1 - 1e-12)) + F.logsigmoid(t) + F.logsigmoid(-t)


def bernoulli() -> Problem:
    return (lambda t: logit_beta(t, 1.1, 1.1) + 2 * F.logsigmoid(t)), (lambda t: logit_beta(t, 3.1, 1.1)), (-5.0, 8.0)


def cauchy(prior_scale: float) -> Problem:
    def log_joint(t: Tensor) -> Tensor:
        prior = -0.5 * (t / prior_scale) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(prior_scale)
        return prior + (-math.log(math.pi) - torch.log1p((CAUCHY_DATA - t) ** 2)).sum(-1, keepdim=True)

    grid = torch.linspace(-15, 15, 300_001, dtype=torch.float64)[:, None]
    log_evidence = torch.logsumexp(log_joint(grid)[:, 0], 0) + math.log(float(grid[1, 0] - grid[0, 0]))
    return log_joint, (lambda t: log_joint(t) - log_evidence), (-5.0, 5.0)


def kl_of(family: str, problem: Problem, seed: int) -> float:
    log_joint, log_posterior, support = problem
    generator = torch.Generator().manual_seed(seed)
    model = MeanFieldGaussian((1,)) if family == "gauss" else BernsteinFlow((1,), int(family), support)
    model = model.double()
    fit_reparameterised(model, log_joint, generator=generator)
    return kl_to_posterior(model, log_posterior, generator=generator)


DESIGN = torch.tensor([[1.0, 1.2], [2.0, 1.8], [-1.0, -1.1], [0.5, 0.7], [-1.5, -1.4], [3.0, 3.1]], dtype=torch.float64)
TARGETS = torch.tensor([1.1, 2.3, -0.4, 0.9, -1.8, 2.9], dtype=torch.float64)
PRECISION = DESIGN.T @ DESIGN + torch.eye(2, dtype=torch.float64)
CORRELATED_DEGREE, CORRELATED_SUPPORT = 10, (-5.0, 5.0)


def regression_log_joint(w: Tensor) -> Tensor:
    """``log N(w; 0, I) + sum_i log N(y_i; x_i . w, 1)`` for ``w`` ``[S, 2]``: ``[S]``."""
    residual = TARGETS - w @ DESIGN.T
    return -0.5 * (w.square().sum(-1) + residual.square().sum(-1)) - 0.5 * (2 + len(TARGETS)) * math.log(2 * math.pi)


def correlated_kl_of(family: str, seed: int) -> float:
    posterior = torch.distributions.MultivariateNormal(
        torch.linalg.solve(PRECISION, DESIGN.T @ TARGETS), precision_matrix=PRECISION
    )
    torch.manual_seed(seed)
    model: ReparameterisedFamily
    if family == "gauss":
        model = MeanFieldGaussian((2,)).double()
    elif family == "mean-field":
        model = BernsteinFlow((2,), CORRELATED_DEGREE, CORRELATED_SUPPORT).double()
    else:
        model = AutoregressiveBernsteinFlow((2,), CORRELATED_DEGREE, CORRELATED_SUPPORT).double()
    generator = torch.Generator().manual_seed(seed)
    fit_reparameterised(model, regression_log_joint, generator=generator)
    return kl_to_posterior(model, posterior.log_prob, generator=generator)


def correlated_section(seeds: int) -> None:
    best_mean_field = float(0.5 * (PRECISION.diagonal().log().sum() - torch.logdet(PRECISION)))
    families = ("gauss", "mean-field", "autoregressive")
    cells = {f: statistics.median(correlated_kl_of(f, seed) for seed in range(seeds)) for f in families}
    print(f"\n2-D linear regression, correlated posterior: KL(q || posterior), median of {seeds} seed(s)")
    print(f"{'Gauss':>11}{'Gauss opt.':>11}{f'MF M={CORRELATED_DEGREE}':>11}{f'AR M={CORRELATED_DEGREE}':>11}")
    print(f"{cells['gauss']:11.3e}{best_mean_field:11.3e}{cells['mean-field']:11.3e}{cells['autoregressive']:11.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=positive_int, default=1, help="seeds per cell (the median is printed)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--correlated", action="store_true", help="add the 2-D correlated linear-regression section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    problems = {"Bernoulli": bernoulli(), "Cauchy, prior N(0,1)": cauchy(1.0), "Cauchy, prior N(0,3^2)": cauchy(3.0)}
    families = ["gauss", *map(str, DEGREES)]
    print(f"KL(q || posterior), median of {args.seeds} seed(s)")
    print(f"{'problem':24}" + "".join(f"{'Gauss' if f == 'gauss' else 'M=' + f:>11}" for f in families))
    for name, problem in problems.items():
        cells = [statistics.median(kl_of(f, problem, seed) for seed in range(args.seeds)) for f in families]
        print(f"{name:24}" + "".join(f"{kl:11.2e}" for kl in cells))
    if args.correlated:
        correlated_section(args.seeds)


if __name__ == "__main__":
    main()
