"""Print the datasets (shape, dtype, chunks, compression) and attributes of an HDF5 file: ``python h5_layout.py F``.

Used by scripts/docs_examples.sh for the layouts shown in docs/format.md; works on any HDF5 file.
"""

import sys

import h5py


def main(path: str) -> None:
    with h5py.File(path, "r") as f:
        print(path)
        for key, ds in f.items():
            print(f"  {key:16} {str(ds.shape):18} {str(ds.dtype):8} chunks={ds.chunks} compression={ds.compression}")
        for key, value in f.attrs.items():
            print(f"  @{key:15} {value!r}")


if __name__ == "__main__":
    main(sys.argv[1])
