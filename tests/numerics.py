"""How the suite chooses numerical tolerances (docs/testing.md): from the arithmetic, never tuned.

Two kinds of claims:

1. An identity that is exact in real arithmetic (accumulation == one big batch, packed == padded,
   2 processes == 1 process with the doubled batch): both sides are computed in **float64** on a
   tiny model (``dtype="float64"``, autocast off). Two float64 evaluations that differ only in
   summation order differ by at most ``(n - 1) * U64 * sum|x_i|`` (Higham, "Accuracy and Stability
   of Numerical Algorithms", eq. 4.4) for n accumulated terms. The tiny models sum at most ~1e5
   terms per value (a 49k-vocabulary log-sum-exp, a few hundred tokens, a few thousand weights per
   gradient-norm term), so ``n * U64 <= 1e5 * 1.1e-16 ~ 1e-11``; ``EXACT64_REL = 1e-9`` leaves 100x
   for error growth through a few layers and one optimizer step. A real bug (a wrong normaliser,
   a token counted twice) shows as a relative difference of 1e-3 or more, so the test keeps its
   power. Quantities that are differences of large sums (DPO's reward margins: sums of <= 1e3
   log-probs of magnitude <= 1e2, subtracted) get an absolute bound as well:
   ``n * U64 * sum|terms| <= 1e3 * 1.1e-16 * 1e5 ~ 1e-8`` worst case, so ``EXACT64_ABS = 1e-8``.

   The same identity in fp32 would need ``n * U32 ~ 1e5 * 6e-8 = 6e-3`` worst case, a bound too
   loose to catch anything; that is why exact claims are checked in float64, and why a tolerance
   that "works" at 1e-4 in fp32 on one CPU fails on another (AVX-512 kernels sum in another order).

2. A claim about low precision (bf16 log-probs close to fp32 ones): bounded by the format's unit
   roundoff times the terms accumulated, written next to the assertion.
"""

from __future__ import annotations

U32 = 2.0**-24  # unit roundoff of fp32 (half an ulp of 1.0)
U64 = 2.0**-53  # unit roundoff of fp64
UBF16 = 2.0**-8  # unit roundoff of bf16 (8 significand bits)

EXACT64_REL = 1e-9
EXACT64_ABS = 1e-8

# Config keys that make a recipe run in float64 with no autocast, whatever the CPU.
FLOAT64 = {"dtype": "float64", "bf16": False}


def tiny_llama_fp64(**kw):
    """The suite's tiny random Llama (tests/conftest.py) in float64."""
    from tests.conftest import make_tiny_llama

    return make_tiny_llama(**kw).double()


def assert_exact64(a: float, b: float, what: str = "", *, abs_tol: float = 0.0) -> None:
    """|a - b| <= EXACT64_REL * max(|a|, |b|) + abs_tol (see the module docstring)."""
    bound = EXACT64_REL * max(abs(a), abs(b)) + abs_tol
    assert abs(a - b) <= bound, f"{what}: {a!r} vs {b!r} differ by {abs(a - b):.3e} > {bound:.3e}"


def assert_state_dicts_exact64(sa: dict, sb: dict) -> None:
    """Every tensor equal to EXACT64_REL of the larger magnitude in the pair (plus EXACT64_ABS for
    entries near 0, e.g. a weight an update moved to ~0)."""
    import torch

    assert sa.keys() == sb.keys()
    for key in sa:
        x, y = sa[key].double(), sb[key].double()
        torch.testing.assert_close(x, y, rtol=EXACT64_REL, atol=EXACT64_ABS, msg=key)
