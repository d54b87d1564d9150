"""segpipe pipeline: one module per stage (fetch, preprocess, train, tune, report, predict)."""

__version__ = "0.1.0"
