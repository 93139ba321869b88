"""Shower files: the native HDF5 format, readers/writers, PyTorch datasets and converters."""

from calofm.data.format import FORMAT_VERSION, FileAttrs, ShowerFileError
from calofm.data.io import ShowerFile, ShowerWriter, read_showers, validate_file, write_showers

__all__ = [
    "FORMAT_VERSION",
    "FileAttrs",
    "ShowerFile",
    "ShowerFileError",
    "ShowerWriter",
    "read_showers",
    "validate_file",
    "write_showers",
]
