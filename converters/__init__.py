"""The only code that knows both frameworks: cut a tf_keras model, export A/C for the
device runtimes and B for the torch server, and prove B numerically equal to Keras."""

__version__ = "0.1.0"

from ._exceptions import ConverterError, InvalidCut, UnsupportedLayer, VerificationError

__all__ = ["ConverterError", "InvalidCut", "UnsupportedLayer", "VerificationError", "__version__"]
