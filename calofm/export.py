"""``calofm export``: the whole sampler of a trained model as one ONNX or TorchScript file.

The graph holds everything between the conditions and the cells: the noise (drawn inside, or given as inputs
with ``noise_inputs``), K solver steps of both networks, the inverse preprocessing, the per-layer rescaling,
the cell cap and the readout threshold. Batch size is dynamic. Two interfaces:

- calofm's: inputs ``energy`` (B,) GeV, ``phi``, ``theta`` (B,) rad, ``geometry`` (B,) int64 model slot;
  output ``showers`` (B, R, P, Z) MeV.
- ``par04=True``, the Geant4 Par04 / DDML contract (docs/geant4.md): input ``input`` (B, 8) =
  [E GeV, phi, theta, five one-hot positions], output ``output`` (B, 6480) in GeV (Par04 multiplies by 1000),
  flattened r -> phi -> z (index (iR * 16 + iPhi) * 45 + iZ). ``slot_map`` names the model geometry behind each
  one-hot position (Par04's order: Par04 Si-W, Par04 Sci-Pb, ODD, CLD, a fine-tuned detector); a position with
  no geometry gives NaN cells, so a wrong one-hot shows at once instead of as a plausible wrong detector.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from calofm.sampling import ShowerSampler

log = logging.getLogger(__name__)
FORMATS = ("onnx", "torchscript")
PAR04_ORDER = ("par04_siw", "par04_scipb", "odd", "cld", None)  # the one-hot positions of Geant4 Par04's input
MIN_OPSET, MAX_OPSET = 14, 17  # attention (scaled_dot_product_attention) needs 14; the exporter writes up to 17


class SamplerGraph(nn.Module):
    """forward(energy, phi, theta, geometry[, noise, profile_noise, extra...]) -> showers (B, R, P, Z) MeV.

    Without ``noise_inputs`` every N(0, I) draw happens inside (``randn_like``: ONNX RandomNormalLike). With
    it the draws are inputs: ``noise`` (B, K, R, P, Z) and, factorised, ``profile_noise`` (B, K, Z + 1), one
    slice per consistency step (K = 1 for the ODE solvers), so two runtimes can be compared exactly."""

    def __init__(self, sampler: ShowerSampler, noise_inputs: bool = False):
        super().__init__()
        self.sampler = sampler
        sampler.checks = False
        self.noise_inputs = noise_inputs
        self.draws = sampler.steps if sampler.sampler == "consistency" else 1
        self.mesh = tuple(sampler.config.mesh_shape)
        self.factorised = sampler.space.factorised
        self.width = sampler.space.profile.width if self.factorised else 0

    def input_names(self) -> list[str]:
        names = ["energy", "phi", "theta", "geometry"]
        return names + (["noise", *(["profile_noise"] if self.factorised else [])] if self.noise_inputs else [])

    def example_inputs(self, batch: int = 2) -> tuple[torch.Tensor, ...]:
        args = (torch.full((batch,), 50.0), torch.zeros(batch), torch.full((batch,), 1.57),
                torch.full((batch,), min(self.sampler.config.geometry_slots.values()), dtype=torch.long))
        if self.noise_inputs:
            g = torch.Generator().manual_seed(0)
            args += (torch.randn(batch, self.draws, *self.mesh, generator=g),)
            if self.factorised:
                args += (torch.randn(batch, self.draws, self.width, generator=g),)
        return args

    def forward(self, energy, phi, theta, geometry, noise=None, profile_noise=None):
        if noise is None:  # internal draws, each like a tensor of the batch's shape
            template = energy.double()[:, None, None, None].expand(-1, *self.mesh)
            noise = torch.randn_like(template)
            if self.factorised:
                profile_noise = torch.randn_like(energy.double()[:, None].expand(-1, self.width))
            fresh = None  # consistency steps after the first: randn_like
        else:
            noise, profile_noise = noise.double(), None if profile_noise is None else profile_noise.double()
            fresh = _Feed(noise, profile_noise)
            noise, profile_noise = noise[:, 0], None if profile_noise is None else profile_noise[:, 0]
        return self.sampler(energy, phi, theta, geometry, noise, profile_noise, generator=fresh)


class _Feed:
    """Hands out the given draws of consistency steps 2..K in the order the sampler asks for them (the
    factorised sampler runs the profile's steps first, then the shower's)."""

    def __init__(self, noise: torch.Tensor, profile_noise: torch.Tensor | None):
        self.next = {"shower": 1, "profile": 1}
        self.noise, self.profile_noise = noise, profile_noise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        part = "profile" if x.ndim == 2 else "shower"
        source = self.profile_noise if part == "profile" else self.noise
        k = self.next[part]
        self.next[part] += 1
        return source[:, k].to(x)


class Par04Graph(nn.Module):
    """forward(input (B, 8)) -> output (B, R * P * Z) GeV: the Geant4 Par04 inference contract."""

    def __init__(self, graph: SamplerGraph, slot_map: list[str | None]):
        super().__init__()
        self.graph = graph
        slots = graph.sampler.config.geometry_slots
        self.register_buffer("slot_of", torch.tensor([slots[g] if g else 0 for g in slot_map], dtype=torch.long))
        self.register_buffer("mapped", torch.tensor([g is not None for g in slot_map]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        position = x[:, 3:8].argmax(dim=1)
        showers = self.graph(x[:, 0], x[:, 1], x[:, 2], self.slot_of[position])  # MeV
        cells = math.prod(self.graph.mesh)  # a constant, so the file says (batch, 6480)
        out = showers.reshape(-1, cells) / 1000.0  # GeV: Par04 multiplies by 1000 to get MeV
        return torch.where(self.mapped[position][:, None], out, torch.full_like(out, math.nan))


def par04_slot_map(config, slot_map: list[str] | None) -> list[str | None]:
    """The model geometry behind each of Par04's five one-hot positions: as given (a name, or '-' for none),
    else Par04's order for the geometries the model knows and, in the fifth position, the one geometry the model
    has beyond Par04's four (an adapted detector), if there is exactly one."""
    known = config.geometry_slots
    if slot_map is not None:
        if len(slot_map) != 5:
            raise ValueError(f"--slot-map needs 5 entries (one per Par04 one-hot position), got {len(slot_map)}")
        out = [None if g in ("-", "", None) else g for g in slot_map]
        unknown = [g for g in out if g is not None and g not in known]
        if unknown:
            raise ValueError(f"--slot-map: the model has no geometry {unknown} (it has {', '.join(sorted(known))})")
    else:
        out = [g if g in known else None for g in PAR04_ORDER]
        extra = sorted(set(known) - set(PAR04_ORDER))
        out[4] = extra[0] if len(extra) == 1 else None
    if not any(out):
        raise ValueError(f"no Par04 one-hot position maps to a geometry of the model ({', '.join(sorted(known))}); "
                         f"give --slot-map, e.g. --slot-map {' '.join(sorted(known)[:1] + ['-'] * 4)}")
    return out


def build_graph(net: nn.Module, config, *, sampler: str | None = None, steps: int | None = None, par04: bool = False,
                slot_map: list[str] | None = None, noise_inputs: bool = False,
                thresholds: dict[str, float] | None = None) -> nn.Module:
    """The module that is exported (also runnable as it is, for comparisons)."""
    if par04 and noise_inputs:
        raise ValueError("the Par04 contract passes no noise: the graph draws it (leave out noise inputs)")
    runner = ShowerSampler(net.float().eval(), config, sampler=sampler, steps=steps, thresholds=thresholds)
    graph = SamplerGraph(runner, noise_inputs=noise_inputs)
    return Par04Graph(graph, par04_slot_map(config, slot_map)).eval() if par04 else graph.eval()


def example_inputs(module: nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...]:
    if isinstance(module, Par04Graph):
        x = torch.zeros(batch, 8)
        x[:, 0], x[:, 2] = 50.0, 1.57
        x[:, 3 + [i for i, m in enumerate(module.mapped.tolist()) if m][0]] = 1.0
        return (x,)
    return module.example_inputs(batch)


def io_names(module: nn.Module) -> tuple[list[str], list[str]]:
    if isinstance(module, Par04Graph):
        return ["input"], ["output"]
    return module.input_names(), ["showers"]


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"ONNX opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")


def write_onnx(module: nn.Module, path: Path, opset: int = 17) -> None:
    """ONNX with a dynamic batch dimension on every input and the output.

    torch's TorchScript-based exporter (``dynamo=False``): on this sampler (the solver loop unrolled into
    2 x (2K - 1) network calls) it exports a small model in seconds where the dynamo exporter took minutes,
    and it writes opsets 14-17 directly (the attention operator needs 14; Geant4's DDML files use 13)."""
    check_opset(opset)
    import warnings

    inputs, outputs = io_names(module)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python floats and shapes taken as constants
        args = example_inputs(module)
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs,
                          output_names=outputs, dynamic_axes={n: {0: "batch"} for n in inputs + outputs},
                          opset_version=opset)
        shape = module(*args).shape
    # the exporter's shape inference loses the cell count after a Where: write the output's fixed dims
    import onnx

    model = onnx.load(str(path))
    for k, size in enumerate(shape[1:], start=1):
        model.graph.output[0].type.tensor_type.shape.dim[k].dim_value = int(size)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def write_torchscript(module: nn.Module, path: Path) -> None:
    """torch.jit.trace of the whole sampler (loops unrolled; the batch size stays free)."""
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example_inputs(module), check_trace=False)
    traced.save(str(path))


def check_file(path: Path, fmt: str, module: nn.Module) -> dict:
    """Run the written file on batches of 1 and 3 (the batch really is dynamic), in ONNX Runtime or TorchScript;
    returns its input/output names and the shapes it produced. A file that does not run is an error."""
    import numpy as np

    shapes = []
    for batch in (1, 3):
        args = example_inputs(module, batch)
        if fmt == "onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            out = session.run(None, {n: a.numpy() for n, a in zip(names[0], args)})[0]
        else:
            names = io_names(module)
            with torch.no_grad():
                out = torch.jit.load(str(path))(*args).numpy()
        if out.shape[0] != batch or not np.isfinite(out).all() or (out < 0).any():
            raise RuntimeError(f"{path}: the exported sampler gave {out.shape} outputs that are not finite "
                               f"non-negative showers for a batch of {batch}")
        shapes.append(tuple(out.shape))
    return {"inputs": names[0], "outputs": names[1], "shapes": shapes}


def export(model: str, out: str | Path, fmt: str = "onnx", *, sampler: str | None = None, steps: int | None = None,
           par04: bool = False, slot_map: list[str] | None = None, noise_inputs: bool = False, opset: int = 17,
           overwrite: bool = False) -> dict:
    """Export ``model`` (folder or Hub id) to ``out``; checked before anything is written, written to a temporary
    file and renamed into place once it has run. Returns what ``check_file`` found, plus the sampler used."""
    from calofm.data.output import check_output
    from calofm.hub.folders import require_calodit
    from calofm.hub.loading import is_adapter, load_network
    from calofm.hub.resolve import resolve

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "onnx":
        check_opset(opset)  # before anything is loaded or written
    folder = resolve(model)
    out = check_output(Path(out), [folder], overwrite)
    if is_adapter(folder):
        raise ValueError(f"{model}: is a LoRA adapter; export the merged model (`calofm adapt ... --merge` writes "
                         "<out>/merged): an exported graph holds one network")
    net, config, cards = load_network(folder)
    require_calodit(net, model, "calofm export")
    thresholds = {n: g.card.threshold for n, g in cards.items() if n not in config.geometry_thresholds}
    module = build_graph(net, config, sampler=sampler, steps=steps, par04=par04, slot_map=slot_map,
                         noise_inputs=noise_inputs, thresholds=thresholds)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        if fmt == "onnx":
            write_onnx(module, tmp, opset)
        else:
            write_torchscript(module, tmp)
        info = check_file(tmp, fmt, module)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    runner = module.graph.sampler if isinstance(module, Par04Graph) else module.sampler
    info.update(sampler=runner.sampler, steps=runner.steps)
    if isinstance(module, Par04Graph):
        info["slot_map"] = par04_slot_map(config, slot_map)
    return info
