"""amortized-nlme: nonlinear mixed-effects models fitted by amortized neural posterior estimation."""

__version__ = "0.1.0"
