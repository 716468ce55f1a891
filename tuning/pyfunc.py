"""Models registered before tuning/ had packages pickled `tuning.pyfunc.FerClassifier`: they still load."""
from tuning.registry.pyfunc import FerClassifier  # noqa: F401
