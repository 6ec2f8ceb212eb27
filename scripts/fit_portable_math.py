"""The polynomial coefficients of csrc/cpu/portable_math.h's double-precision tanh and erf: Chebyshev
fits (mpmath.chebyfit, 40 digits) converted to monomials, printed as C++ arrays with the fit's
error. Run by hand (`python scripts/fit_portable_math.py`); needs mpmath (torch's sympy has it).
The float erf's coefficients are fitted in double by numpy (see the header's comments)."""

import mpmath as mp

mp.mp.dps = 40


def fit(name, f, a, b, degree):
    """Monomial coefficients, lowest first, of the degree-`degree` Chebyshev fit of f(a + (b - a)(t + 1) / 2)
    over t in [-1, 1]."""
    coeffs, err = mp.chebyfit(lambda t: f(a + (b - a) * (t + 1) / 2), [-1, 1], degree + 1, error=True)
    print(f"// {name}: degree {degree} on [{a}, {b}] in t = (2x - {a + b}) / {b - a}, max error {float(err):.2e}")
    print(f"constexpr double {name}[] = {{" + ", ".join(repr(float(c)) for c in reversed(coeffs)) + "};")


def fit_plain(name, f, a, b, degree):
    coeffs, err = mp.chebyfit(f, [a, b], degree + 1, error=True)
    print(f"// {name}: degree {degree} on [{a}, {b}], max error {float(err):.2e}")
    print(f"constexpr double {name}[] = {{" + ", ".join(repr(float(c)) for c in reversed(coeffs)) + "};")


def sqrt_or(u, limit, g):
    return limit if u == 0 else g(mp.sqrt(u))


if __name__ == "__main__":
    # tanh(z) = z + z^3 P(z^2) for |z| <= 0.55.
    fit_plain("kTanhSmall", lambda u: sqrt_or(u, -mp.mpf(1) / 3, lambda z: (mp.tanh(z) - z) / z**3), 0, 0.55**2, 10)
    # erf(x) = x + x P(x^2) for |x| <= 0.875.
    fit_plain("kErfNear", lambda u: sqrt_or(u, 2 / mp.sqrt(mp.pi) - 1, lambda x: (mp.erf(x) - x) / x), 0, 0.875**2, 11)
    # erf(x) = 1 - e^(-x^2) G(x), G = e^(x^2) erfc(x), on [0.875, 2.25] and [2.25, 6].
    g = lambda x: mp.exp(x * x) * mp.erfc(x)
    fit("kErfcMid", g, mp.mpf(0.875), mp.mpf(2.25), 17)
    fit("kErfcFar", g, mp.mpf(2.25), mp.mpf(6), 18)
