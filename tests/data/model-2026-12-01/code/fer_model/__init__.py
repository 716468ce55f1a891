"""FER2013 facial-expression recognition: data, models, training and evaluation.

This package knows nothing of Ray or MLflow; the `tuning` package drives it through
`fer_model.training.fit`, whose per-epoch callback is the only way progress leaves a run.
"""

from fer_model.errors import ConfigError, DataError

__all__ = ["ConfigError", "DataError"]
