"""How far apart two float32 computations of the same value may land when only their rounding differs.

Equivalence tests compare two paths through the same maths: vmap over K clients against a loop, a
Flower node against the in-process driver, a stacked network against single ones. In float32 they
differ only in the order of their additions, and that order also changes with the number of BLAS/OpenMP
threads splitting a reduction, so a tolerance read off one machine's run fails on another (1e-5 held
at one thread and failed at two, by 2e-5). The bound below follows from float32 arithmetic instead.

Derivation. One addition rounds its result s to s(1 + d) with |d| <= u = eps/2 (eps = 2^-23, float32).
Two orders of the same sum round different partial sums, so their results differ by a sum of T
rounding errors, each at most u times a partial sum of magnitude <= scale. Treated as independent and
uniform on [-u, u] (the probabilistic model of rounding, Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., sec. 2.8), they add up like a random walk: standard deviation
sigma = u / sqrt(3) * sqrt(T) * scale, instead of the worst case T * u * scale. Of n compared values,
the largest deviation exceeds sigma * (sqrt(2 ln n) + z) with probability at most exp(-z^2 / 2) (the
Gaussian maximum bound); z = 4 makes a false failure a 3e-4 event.

What T is, per kind of computation (each test states its own):
- a forward pass: the longest reduction behind one output (a layer's fan-in, or B * positions of a
  batch statistic);
- training: steps * B * positions: one gradient entry of a convolution sums B * positions products per
  step, and a parameter accumulates one such gradient per step. Differences in one layer flow into every
  other through later steps, so the scale is the largest magnitude among all compared tensors, not
  each tensor's own.
"""

import math

import torch

EPS32 = torch.finfo(torch.float32).eps
Z = 4.0


def float32_tolerance(scale, terms, compared=1):
    """Absolute bound on |a - b| for ``compared`` values, each reached by ``terms`` float32 roundings of
    quantities of magnitude at most ``scale``, in two summation orders."""
    if terms < 1 or compared < 1:
        raise ValueError(f"terms={terms} and compared={compared} must be >= 1: count the roundings and the values")
    sigma = (EPS32 / 2) / math.sqrt(3) * math.sqrt(terms) * float(scale)
    return sigma * (math.sqrt(2 * math.log(compared)) + Z)


def params_tolerance(params, terms):
    """``float32_tolerance`` for a dict of parameter tensors compared entry by entry (see the docstring)."""
    scale = max(float(p.detach().abs().max()) for p in params.values())
    return float32_tolerance(scale, terms, compared=sum(p.numel() for p in params.values()))


def training_terms(steps, batch, positions):
    """T of a training run: ``steps`` updates, each gradient entry a sum over ``batch`` samples times
    ``positions`` (the spatial positions of a convolution's input; 1 for a dense layer)."""
    return steps * batch * positions
