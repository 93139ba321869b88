"""calofm.data.dataset: multi-file dataset with geometry slots, and the step-keyed batch sampler."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from calofm.data import ShowerFileError
from calofm.data.dataset import ShowerDataset, Source, StepBatchSampler, make_loader, sequential_batches
from calofm.geometry import load_geometry

FILES = [("par04_siw", 5), ("odd", 7), ("cld", 3)]  # geometry, showers; slots 0, 1, 4


@pytest.fixture(scope="module")
def three_files(tmp_path_factory):
    """Three small files of different geometries and their contents read with plain h5py."""
    from conftest import random_showers

    from calofm.data import FileAttrs, write_showers

    folder = tmp_path_factory.mktemp("ds")
    paths, truth = [], []
    for i, (geometry, n) in enumerate(FILES):
        data = random_showers(n, seed=100 + i)
        path = write_showers(folder / f"{geometry}.h5", *data.values(), attrs=FileAttrs(geometry=geometry),
                             compression=None)
        with h5py.File(path, "r") as f:
            truth.append({k: f[k][:] for k in f})
        paths.append(path)
    return paths, truth


@pytest.fixture(scope="module")
def dataset(three_files):
    paths, _ = three_files
    return ShowerDataset([(paths[0], "par04_siw"), (str(paths[1]), "odd"), Source(paths[2], load_geometry("cld"))])


def expected_rows(three_files, index):
    """(file, row) ground truth for global indices, by hand from the file sizes."""
    _, truth = three_files
    starts = np.cumsum([0] + [n for _, n in FILES])
    out = []
    for i in index:
        f = int(np.searchsorted(starts, i, side="right") - 1)
        out.append((f, i - starts[f]))
    return out, truth


# ----------------------------------------------------------------------------------------------
# ShowerDataset
# ----------------------------------------------------------------------------------------------


def test_dataset_layout(dataset):
    assert len(dataset) == 15
    assert [g.name for g in dataset.geometries] == ["par04_siw", "odd", "cld"]
    np.testing.assert_array_equal(dataset.slots, [0, 1, 4])
    np.testing.assert_array_equal(dataset.file_of(np.array([0, 4, 5, 11, 12, 14])), [0, 0, 1, 1, 2, 2])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 14), max_size=40))
def test_getitems_returns_the_file_rows_and_geometry_slots(three_files, dataset, index):
    batch = dataset.__getitems__(index)
    where, truth = expected_rows(three_files, index)
    assert batch["showers"].shape == (len(index), 9, 16, 45) and batch["showers"].dtype == torch.float32
    assert batch["geometry"].dtype == torch.int64
    slots = [0, 1, 4]
    for j, (f, row) in enumerate(where):
        assert batch["geometry"][j].item() == slots[f]
        np.testing.assert_array_equal(batch["showers"][j].numpy(), truth[f]["showers"][row])
        for key, name in (("energy", "incident_energy"), ("phi", "incident_phi"), ("theta", "incident_theta")):
            assert batch[key][j].item() == truth[f][name][row]


def test_getitem_single_row(three_files, dataset):
    item = dataset[6]  # second row of the ODD file
    _, truth = three_files
    assert item["showers"].shape == (9, 16, 45) and item["geometry"].item() == 1
    np.testing.assert_array_equal(item["showers"].numpy(), truth[1]["showers"][1])


def test_dataset_rejects_bad_sources(three_files, tmp_showers):
    paths, _ = three_files
    with pytest.raises(ValueError, match="needs at least one file"):
        ShowerDataset([])
    with pytest.raises(ShowerFileError, match="geometry mismatch: file holds 'odd', asked for 'cld'"):
        ShowerDataset([(paths[1], "cld")])
    empty = tmp_showers(0, geometry="odd")
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        ShowerDataset([(paths[0], "par04_siw"), (empty, "odd")])


def test_sequential_batches_cover_every_row_in_order(three_files, dataset):
    _, truth = three_files
    batches = list(sequential_batches(dataset, batch_size=4))
    assert [len(b["energy"]) for b in batches] == [4, 4, 4, 3]
    energies = torch.cat([b["energy"] for b in batches]).numpy()
    np.testing.assert_array_equal(energies, np.concatenate([t["incident_energy"] for t in truth]))
    assert sum(len(b["energy"]) for b in sequential_batches(dataset, 4, limit=6)) == 6


def test_loader_yields_the_sampler_batches(dataset):
    sampler = StepBatchSampler([5, 7, 3], batch_size=8, steps=3, seed=1, run=2)
    batches = list(make_loader(dataset, sampler))
    assert len(batches) == 3
    for got, index in zip(batches, sampler):
        expected = dataset.__getitems__(index)
        for key in expected:
            assert torch.equal(got[key], expected[key])


def test_forked_workers_read_the_same_rows_as_the_main_process(three_files):
    paths, _ = three_files
    ds = ShowerDataset([(paths[0], "par04_siw"), (paths[1], "odd"), (paths[2], "cld")])
    sampler = StepBatchSampler(ds.sizes, batch_size=6, steps=6, seed=2, run=2)
    ds.__getitems__([0, 5, 12])  # the parent has read through its handles before the workers fork
    serial = list(make_loader(ds, sampler, num_workers=0))
    forked = list(make_loader(ds, sampler, num_workers=2))
    assert len(forked) == len(serial) == 6
    for a, b in zip(serial, forked):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_a_reader_opens_its_own_handle_in_a_new_process(three_files, monkeypatch):
    import calofm.data.io as io

    paths, truth = three_files
    f = io.ShowerFile(paths[1])
    parent = f._file()
    monkeypatch.setattr(io.os, "getpid", lambda: -12345)  # as in a forked DataLoader worker
    np.testing.assert_array_equal(f.read([3, 1])["showers"], truth[1]["showers"][[3, 1]])
    assert f._file() is not parent and parent.id.valid  # the parent's handle is neither used nor closed
    f.close()
    assert parent.id.valid  # a child does not close what its parent opened
    monkeypatch.undo()
    parent.close()


# ----------------------------------------------------------------------------------------------
# StepBatchSampler
# ----------------------------------------------------------------------------------------------

SIZES = [300, 200, 100]


def test_batch_k_is_a_pure_function_of_seed_and_step():
    a = StepBatchSampler(SIZES, batch_size=32, steps=10, seed=5)
    b = StepBatchSampler(SIZES, batch_size=32, steps=10, seed=5)
    assert list(a) == list(b)
    np.testing.assert_array_equal(a.global_batch(7), b.global_batch(7))
    batches = [tuple(x) for x in a]
    assert len(set(batches)) == 10  # every step differs
    other_seed = StepBatchSampler(SIZES, batch_size=32, steps=10, seed=6)
    assert all(x != y for x, y in zip(list(a), list(other_seed)))


def test_batches_are_made_of_whole_runs_inside_one_file():
    s = StepBatchSampler(SIZES, batch_size=48, steps=30, seed=0, run=16)
    offsets = np.cumsum([0] + SIZES)
    for batch in s:
        idx = np.array(batch)
        assert len(idx) == 48 and idx.min() >= 0 and idx.max() < 600
        # 3 runs of 16 rows, each inside one file (runs may overlap, so count rows per file)
        per_file = np.bincount(np.searchsorted(offsets, idx, side="right") - 1, minlength=3)
        assert all(c % 16 == 0 for c in per_file), per_file


@pytest.mark.parametrize("start", [0, 1, 4, 9, 10])
def test_resume_at_a_step_equals_the_tail_of_a_full_run(start):
    full = list(StepBatchSampler(SIZES, batch_size=16, steps=10, seed=3))
    resumed = StepBatchSampler(SIZES, batch_size=16, steps=10, seed=3, start_step=start)
    assert len(resumed) == 10 - start and list(resumed) == full[start:]


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_concatenate_to_the_single_process_batch(world):
    single = list(StepBatchSampler(SIZES, batch_size=32, steps=5, seed=9))
    ranks = [list(StepBatchSampler(SIZES, batch_size=32, steps=5, seed=9, rank=r, world=world)) for r in range(world)]
    for step, batch in enumerate(single):
        parts = [ranks[r][step] for r in range(world)]
        assert all(len(p) == 32 // world for p in parts)
        assert sum(parts, []) == batch


def _share_of_file0(sampler) -> float:
    idx = np.concatenate([np.array(b) for b in sampler])
    return float(np.mean(idx < 1000))


def test_mixing_weights_are_respected():
    # 400 steps x 4 runs = 1600 file draws: the binomial spread of the share is 0.011 (4 sigma = 0.043)
    weighted = StepBatchSampler([1000, 1000], batch_size=64, steps=400, seed=0, weights=[3, 1])
    assert _share_of_file0(weighted) == pytest.approx(0.75, abs=0.043)
    by_size = StepBatchSampler([1000, 1000 // 3], batch_size=64, steps=400, seed=0)  # default: proportional to size
    assert _share_of_file0(by_size) == pytest.approx(0.75, abs=0.043)
    only_second = StepBatchSampler([1000, 1000], batch_size=64, steps=50, seed=0, weights=[0, 1])
    assert _share_of_file0(only_second) == 0.0


def test_files_shorter_than_a_run_are_topped_up():
    s = StepBatchSampler([3, 5], batch_size=32, steps=5, seed=2, run=16)
    for batch in s:
        assert len(batch) == 32 and min(batch) >= 0 and max(batch) < 8


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"weights": [1, 2]}, r"mixing weights \[1\.0, 2\.0\] must be finite, >= 0, one per file"),
    ({"weights": [1, -1, 1]}, r"\[1\.0, -1\.0, 1\.0\] must be finite, >= 0"),
    ({"weights": [0, 0, 0]}, "not all zero"),
    ({"weights": [1, float("nan"), 1]}, r"\[1\.0, nan, 1\.0\] must be finite"),
    ({"world": 3}, "global batch size 32 is not divisible by 3 processes"),
    ({"world": 2, "rank": 2}, r"rank 2 outside \[0, 2\)"),
    ({"rank": -1}, r"rank -1 outside \[0, 1\)"),
    ({"batch_size": 0}, "batch_size, run and world must be >= 1"),
    ({"run": 0}, "batch_size, run and world must be >= 1"),
])
def test_sampler_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepBatchSampler(SIZES, **({"batch_size": 32, "steps": 3} | kwargs))
