"""Every figure of segpipe, and the only package that imports matplotlib (Agg backend, chosen here
once): ``run`` (a train run's confusion matrix and prediction grid), ``report`` (the comparison
plots of `segpipe report`) and ``tune`` (the plots of `segpipe tune`). Figures are drawn from plain
data (arrays, records, trial rows): this package imports no layer above data."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

__all__ = ["plt"]
