"""Run data: mixing weights per source (not per file), the slot rows are labelled with, values checked first."""

import numpy as np
import pytest

from calofm.data.dataset import StepBatchSampler
from calofm.training.config import DataConfig, SourceConfig
from calofm.training.data import prepare_data


def sources(tmp_showers, sizes_a=(50, 100, 150), sizes_b=(100,), val=0, **kw):
    a = [str(tmp_showers(n=n, seed=i, geometry="par04_siw", name=f"a{i}.h5")) for i, n in enumerate(sizes_a)]
    b = [str(tmp_showers(n=n, seed=10 + i, geometry="ild", name=f"b{i}.h5")) for i, n in enumerate(sizes_b)]
    return DataConfig(sources=[SourceConfig(geometry="par04_siw", files=a, val_samples=val, **kw),
                               SourceConfig(geometry="ild", files=b, val_samples=val)], num_workers=0)


def test_a_source_gets_its_weight_however_many_files_it_has(tmp_showers):
    data = prepare_data(sources(tmp_showers), progress=False)
    w = np.array(data.train.weights)
    np.testing.assert_allclose(w, [50 / 300, 100 / 300, 150 / 300, 1.0])  # split by rows, sums to the weight
    sampler = StepBatchSampler(data.train.sizes, 64, 3000, seed=0, weights=data.train.weights)
    rows = np.concatenate([sampler.global_batch(step) for step in range(3000)])
    from_a = (rows < data.train.offsets[3]).mean()
    assert abs(from_a - 0.5) < 0.02, from_a  # was 0.75: three files against one
    # every row of a source is equally likely, whichever file it is in
    per_file = np.bincount(data.train.file_of(rows), minlength=4) / len(rows)
    np.testing.assert_allclose(per_file[:3] / per_file[:3].sum(), [1 / 6, 2 / 6, 3 / 6], atol=0.02)


def test_weights_follow_the_training_rows_left_after_the_validation_split(tmp_showers):
    data = prepare_data(sources(tmp_showers, val=50, weight=3.0), progress=False)
    np.testing.assert_allclose(data.train.weights, [3 * 50 / 250, 3 * 100 / 250, 3 * 100 / 250, 1.0])
    assert list(data.train.sizes) == [50, 100, 100, 50]
    assert len(data.val["par04_siw"]) == 50 and len(data.val["ild"]) == 50


def test_rows_are_labelled_with_the_slot_the_model_uses(tmp_showers):
    data = prepare_data(sources(tmp_showers, slot=6), progress=False)
    assert data.geometries["par04_siw"].slot == 6 and list(data.train.slots) == [6, 6, 6, 2]
    assert int(data.val.get("par04_siw", data.train).__getitems__([0])["geometry"][0]) == 6
    with pytest.raises(ValueError, match="both use slot 2"):
        prepare_data(sources(tmp_showers, slot=2), progress=False)


def write_raw(path, data: dict, **attrs):
    """A file written with h5py directly: no checks, so it can hold anything."""
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
        for key, value in attrs.items():
            f.attrs[key] = value
    return path


def test_bad_values_are_found_before_training(tmp_path, tmp_showers):
    from conftest import random_showers

    d = random_showers(40, seed=3)
    d["showers"][33, 1, 2, 3] = np.nan
    bad = write_raw(tmp_path / "nan.h5", d, geometry="par04_siw")
    cfg = DataConfig(sources=[SourceConfig(geometry="par04_siw", files=[str(bad)], val_samples=0)])
    with pytest.raises(ValueError, match=r"nan.h5: 'showers' holds NaN/Inf \(first in shower 33\)"):
        prepare_data(cfg, progress=False)
    empty = write_raw(tmp_path / "empty.h5", {k: v[:0] for k, v in random_showers(1).items()})
    cfg = DataConfig(sources=[SourceConfig(geometry="par04_siw", files=[str(empty)], val_samples=0)])
    with pytest.raises(ValueError, match="empty.h5: holds no showers"):
        prepare_data(cfg, progress=False)
