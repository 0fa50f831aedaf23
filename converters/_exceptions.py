"""Errors of the converters.

SpliteasyError
└── ConverterError         conversion cannot produce a faithful bundle
    ├── InvalidCut         a requested cut is not a single-tensor cut point (names it)
    ├── UnsupportedLayer   a layer the toolchain cannot carry (names it)
    └── VerificationError  torch B disagrees with Keras B (names the tensor and error)
"""

from shared_schema import SpliteasyError


class ConverterError(SpliteasyError):
    pass


class InvalidCut(ConverterError):
    pass


class UnsupportedLayer(ConverterError):
    pass


class VerificationError(ConverterError):
    pass
