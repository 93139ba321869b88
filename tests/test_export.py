"""calofm export: ONNX Runtime and TorchScript run the same sampler as PyTorch, and the Par04-contract file has
exactly the documented names, shapes, units and cell order."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from train_helpers import run, tiny_config

from calofm.cli import main as cli
from calofm.export import SamplerGraph, build_graph, example_inputs, export, par04_slot_map
from calofm.hub.loading import load_network


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return run(tiny_config(root / "run", root / "cache", steps=6, val_every=6, **{"model.variant": "factorised"}))


def onnx_run(path, args):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]


@pytest.mark.parametrize("sampler, steps", [("heun", 2), ("dpmpp_2m", 3)])
def test_onnx_runtime_and_torchscript_agree_with_pytorch_on_the_same_noise(model, tmp_path, sampler, steps):
    net, config, _ = load_network(model)
    graph = build_graph(net, config, sampler=sampler, steps=steps, noise_inputs=True)
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        info = export(str(model), tmp_path / name, fmt, sampler=sampler, steps=steps, noise_inputs=True)
        assert info["inputs"] == ["energy", "phi", "theta", "geometry", "noise", "profile_noise"]
        assert info["shapes"] == [(1, 9, 16, 45), (3, 9, 16, 45)]
    args = example_inputs(graph, 5)  # another batch size than the one traced
    args = (torch.tensor([3.0, 10.0, 40.0, 80.0, 45.0]), *args[1:])
    with torch.no_grad():
        expected = graph(*args).numpy()
        scripted = torch.jit.load(str(tmp_path / "m.pt"))(*args).numpy()
    got = onnx_run(tmp_path / "m.onnx", args)
    assert expected.shape == (5, 9, 16, 45) and expected.sum() > 0
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.max())
    np.testing.assert_allclose(scripted, expected, rtol=1e-5, atol=1e-5 * expected.max())
    # the graph is the generator's sampler: the same showers as ShowerSampler with the same draws
    runner = graph.sampler
    with torch.no_grad():
        direct = runner(*args[:4], args[4][:, 0].double(), args[5][:, 0].double()).numpy()
    np.testing.assert_array_equal(direct, expected)


def test_par04_contract(model, tmp_path):
    path = tmp_path / "par04.onnx"
    info = export(str(model), path, "onnx", steps=2, par04=True, opset=14)
    assert info["slot_map"] == ["par04_siw", None, None, None, "ild"]  # Par04's order; the 5th: the other one
    m = onnx.load(str(path))
    assert m.opset_import[0].version == 14
    (inp,), (out,) = m.graph.input, m.graph.output
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (inp, out)]
    assert (inp.name, out.name) == ("input", "output") and dims == [["batch", 8], ["batch", 6480]]
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = torch.zeros(4, 8)
    x[:, 0], x[:, 1], x[:, 2] = torch.tensor([10.0, 50.0, 50.0, 50.0]), 0.3, 1.5
    x[0, 3], x[1, 3], x[2, 7], x[3, 5] = 1, 1, 1, 1  # Par04 Si-W, Si-W, the 5th position (ILD), ODD (absent)
    y = onnx_run(path, (x,))
    assert y.shape == (4, 6480) and np.isfinite(y[:3]).all() and (y[:3] >= 0).all()
    assert np.isnan(y[3]).all()  # a position without a geometry is visible at once
    # units and order against PyTorch: the same internal draws (seeded) through the calofm interface
    net, config, _ = load_network(model)
    par04 = build_graph(net, config, steps=2, par04=True)
    plain = SamplerGraph(par04.graph.sampler)
    torch.manual_seed(7)
    with torch.no_grad():
        flat = par04(x[:3]).numpy()
    torch.manual_seed(7)
    with torch.no_grad():
        mev = plain(x[:3, 0], x[:3, 1], x[:3, 2], torch.tensor([config.geometry_slots["par04_siw"]] * 2
                                                             + [config.geometry_slots["ild"]])).numpy()
    np.testing.assert_allclose(flat * 1000, mev.reshape(3, -1), rtol=1e-6)  # GeV; C order of (r, phi, z)
    i_r, i_phi, i_z = 2, 5, 17
    assert flat[0, (i_r * 16 + i_phi) * 45 + i_z] * 1000 == pytest.approx(mev[0, i_r, i_phi, i_z], rel=1e-6)
    # Geant4 sees GeV: a 50 GeV photon deposits less than 50 GeV (in MeV the sum would be ~1000x larger)
    assert 0 < y[1].sum() < 50


def test_slot_map_rules():
    class C:
        geometry_slots = {"par04_siw": 0, "odd": 2, "allegro": 5}

    assert par04_slot_map(C, None) == ["par04_siw", None, "odd", None, "allegro"]
    assert par04_slot_map(C, ["-", "-", "-", "-", "allegro"]) == [None, None, None, None, "allegro"]
    with pytest.raises(ValueError, match="no geometry"):
        par04_slot_map(C, ["ild", "-", "-", "-", "-"])
    with pytest.raises(ValueError, match="5 entries"):
        par04_slot_map(C, ["odd"])

    class Only:
        geometry_slots = {"a": 0, "b": 1}

    with pytest.raises(ValueError, match="--slot-map"):
        par04_slot_map(Only, None)


def test_export_command_and_its_errors(model, tmp_path, capsys):
    out = tmp_path / "cd.pt"
    assert cli(["export", "--model", str(model), "--format", "torchscript", "--steps", "2", "--geant4-par04",
                "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "inputs input -> output" in printed and "7: ild" in printed and "heun, 2 steps" in printed
    assert torch.jit.load(str(out))(torch.tensor([[20.0, 0, 1.5, 1, 0, 0, 0, 0]])).shape == (1, 6480)
    before = out.read_bytes()
    assert cli(["export", "--model", str(model), "--steps", "2", "--out", str(out), "--format", "torchscript"]) != 0
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before  # never overwritten unasked
    bad = [["--out", str(model / "config.json")],  # into the model folder
           ["--out", str(tmp_path / "x.onnx"), "--slot-map", "odd", "-", "-", "-", "-"],  # without --geant4-par04
           ["--out", str(tmp_path / "x.onnx"), "--geant4-par04", "--slot-map", "odd", "-", "-", "-", "-"],
           ["--out", str(tmp_path / "x.onnx"), "--sampler", "consistency"]]
    for extra in bad:
        assert cli(["export", "--model", str(model), "--steps", "2", *extra]) != 0, extra
        err = capsys.readouterr().err
        assert err.strip() and len(err.strip().splitlines()) <= 2, err
    with pytest.raises(SystemExit):  # argparse: opset 12 has no attention operator
        cli(["export", "--model", str(model), "--out", str(tmp_path / "x.onnx"), "--opset", "12"])
    assert "outside [14, 17]" in capsys.readouterr().err
    assert not any(tmp_path.glob("x.onnx*")) and not any(tmp_path.glob(".x.onnx*"))
