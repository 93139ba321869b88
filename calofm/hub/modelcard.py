"""Model cards and dataset cards: the README.md of a Hub repo, written from what a calofm folder or file records.

A model card is rendered from ``hub/model_card.md`` (a jinja2 template shipped as ``calofm/hub/templates``) with
the folder's ``config.json`` or ``calofm_adapter.json``, its stored geometry cards, ``calofm_training.json`` when
present and any ``metrics.json`` of ``calofm evaluate``. A dataset card describes native shower files that are
uploaded as Parquet shards. Cards hold file names, never the user's local paths (a home directory is shown as
``~``), and ``card_metadata_errors`` checks the metadata calofm relies on before anything is published.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData, try_to_load_from_cache

from calofm.data.integrity import read_json
from calofm.data.output import write_text_atomic
from calofm.geometry import MESH_SHAPE
from calofm.hub.folders import DISTILL_FILE
from calofm.hub.loading import is_adapter
from calofm.hub.resolve import is_repo_id, split_revision
from calofm.models import BASELINES, family_classes

TEMPLATES = Path(__file__).parent / "templates"
LICENSE = "apache-2.0"
DATASET_LICENSE = "cc-by-4.0"
MODEL_TAGS = ("calorimeter", "fast-simulation", "diffusion", "high-energy-physics")
DATASET_TAGS = ("calorimeter", "fast-simulation", "high-energy-physics", "calofm")
RELATIONS = {"lora": "adapter", "full": "finetune"}  # kind -> base_model_relation (scratch: none)
KINDS = {"pretrained": "pretrained model", "lora": "LoRA adapter", "full": "fine-tuned model",
         "scratch": "model trained from scratch", "distilled": "distilled student", "baseline": "baseline model"}
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_VARIANTS = {
    "single": "one network denoises the whole shower (cell energies / E_inc in log space), as CaloDiT-2.",
    "factorised": "an energy model samples the 45 layer energies, CaloDiT draws each layer's cells, and every "
                  "layer is rescaled to its sampled energy.",
}


# ----------------------------------------------------------------------------------------------
# Small formatting helpers
# ----------------------------------------------------------------------------------------------


def shown_path(path: str | Path) -> str:
    """A path as it may appear in a card: the user's home directory as ``~`` (``expanduser`` undoes it)."""
    text, home = str(path), os.path.expanduser("~").rstrip("/")
    if home and home != "~" and (text == home or text.startswith(home + "/")):
        return "~" + text[len(home):]
    return text


def _num(value, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


def _span(pair) -> str:
    return f"{_num(pair[0])} – {_num(pair[1])}"


def _duration(seconds) -> str:
    s = math.nan if seconds is None else float(seconds)
    return ("not recorded" if math.isnan(s) else f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"
            if s < 3600 else f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min")


def _check_repo_id(repo_id: str | None, where) -> None:
    if repo_id is not None and (not is_repo_id(repo_id) or "@" in repo_id):
        raise ValueError(f"{where}: repo id '{repo_id}' is not a Hub repo id (ORG/NAME)")


def safetensors_parameters(path: Path) -> int:
    """Number of parameters in a safetensors file, from its JSON header (no tensor is read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header size {size})")
        header = json.loads(f.read(size))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


# ----------------------------------------------------------------------------------------------
# What a folder holds
# ----------------------------------------------------------------------------------------------


def folder_kind(folder: str | Path) -> str:
    """"lora", "full", "scratch", "distilled", "baseline" (another model family) or "pretrained"; a ValueError
    for a folder that is no calofm model or adapter."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (a model card is written for a model or adapter folder)")
    if is_adapter(folder):
        return "lora"
    if not (folder / "config.json").exists():
        raise ValueError(f"{folder}: not a calofm model or adapter (no config.json or adapter_config.json)")
    config = read_json(folder / "config.json")
    if config.get("model_type", "calodit") != "calodit":
        return "baseline"
    if (folder / DISTILL_FILE).exists() or config.get("consistency_sigmas"):
        return "distilled"
    if (folder / "calofm_adapter.json").exists():
        method = read_json(folder / "calofm_adapter.json").get("method")
        if method not in ("full", "scratch"):
            raise ValueError(f"{folder / 'calofm_adapter.json'}: method {method!r} of a full model is not full/scratch")
        return method
    return "pretrained"


def _architecture(config: dict, parameters: int | None) -> dict:
    variant = config.get("variant", "single")
    slots = int(config.get("n_geometry_slots", 0))
    family = config.get("model_type", "calodit")
    title, text = family, "see the calofm documentation (docs/baselines.md)"
    if family in BASELINES:
        model_class = family_classes(family)[1]
        title, text = model_class.title, model_class.summary
    return {"family": None if family == "calodit" else family, "family_title": title, "family_text": text,
            "variant": variant, "variant_text": _VARIANTS.get(variant, "see the calofm documentation."),
            "patch": " x ".join(str(p) for p in config.get("patch_size", ())),
            "hidden": config.get("hidden_size"), "depth": config.get("num_hidden_layers"),
            "heads": config.get("num_attention_heads"),
            "parameters": f"{parameters:,}" if parameters is not None else "an unknown number of",
            "sigma_data": config.get("sigma_data"), "P_mean": config.get("P_mean"), "P_std": config.get("P_std"),
            "slots": slots, "spare": slots - len(config.get("geometry_slots", {})),
            "student_steps": len(config.get("consistency_sigmas") or []),
            "student_sigmas": ", ".join(f"{s:.3g}" for s in config.get("consistency_sigmas") or [])}


def _geometry_row(name: str, slot, threshold, card) -> dict:
    c = card.card if card is not None else None
    return {"name": name, "slot": slot, "threshold": _num(threshold),
            "title": c.title.replace("|", "/") if c else "card not stored", "particle": c.particle if c else "—",
            "energy": _span(c.energy) if c else "—", "theta": _span(c.theta) if c else "—",
            "phi": _span(c.phi) if c else "—", "card": card}


def read_folder(folder: Path) -> dict:
    """The facts of a model or adapter folder a card needs (its files checked as loading checks them)."""
    from calofm.hub.adapters import base_of, read_adapter
    from calofm.hub.folders import WEIGHTS, check_model_folder, read_card

    kind = folder_kind(folder)
    facts: dict = {"kind": kind, "arch": None, "adapter": None}
    if kind == "lora":
        info, card = read_adapter(folder)
        peft = read_json(folder / "adapter_config.json")
        where = _base_folder(*base_of(folder, info))
        base_config = read_json(where / "config.json") if where is not None else None
        if base_config is not None:
            parameters = safetensors_parameters(where / WEIGHTS) if (where / WEIGHTS).is_file() else None
            facts["arch"] = _architecture(base_config, parameters)
        base_geometries = sorted((base_config or {}).get("geometry_slots", {}))
        facts["geometries"] = [_geometry_row(info["geometry"], info["slot"], info["threshold"], card)]
        facts["adapter"] = {**info, "alpha": _num(peft.get("lora_alpha")), "base_geometries": ", ".join(
            f"`{g}`" for g in base_geometries if g != info["geometry"]), "known": base_config is not None,
            "targets": ", ".join(sorted(peft.get("target_modules") or [])) or "adapted"}
        facts["names"] = {info["geometry"], *base_geometries}
    else:
        config = check_model_folder(folder)
        cards = {n: read_card(folder, n, sha, folder / "config.json")
                 for n, sha in config.get("geometry_cards", {}).items()}
        thresholds = config.get("geometry_thresholds", {})
        slots = config.get("geometry_slots", {})
        facts["geometries"] = [_geometry_row(n, s, thresholds.get(n), cards.get(n))
                               for n, s in sorted(slots.items(), key=lambda item: item[1])]
        facts["arch"] = _architecture(config, safetensors_parameters(folder / WEIGHTS))
        facts["names"] = set(slots)
        if kind in ("full", "scratch"):
            facts["adapter"] = {**read_json(folder / "calofm_adapter.json"), "known": True}
    if not facts["geometries"]:
        raise ValueError(f"{folder}: the model claims no geometry (config.json geometry_slots is empty)")
    adapter = facts["adapter"]
    if adapter is not None:
        adapter.update(hub_base(adapter), base=shown_path(adapter.get("base", "")),
                       trainable=_num(adapter.get("trainable_parameters"), ","),
                       total=_num(adapter.get("total_parameters"), ","))
    return facts


def _base_folder(where: str, revision: str | None) -> Path | None:
    """An adapter's base folder if it is on this machine: a local folder, or a Hub snapshot already in the cache
    (looked up offline, nothing is downloaded)."""
    if (Path(where) / "config.json").is_file():
        return Path(where)
    if not is_repo_id(where):
        return None
    hit = try_to_load_from_cache(split_revision(where)[0], "config.json", revision=revision)
    return Path(hit).parent if isinstance(hit, str) else None


def hub_base(info: dict) -> dict:
    """{"base_repo": Hub repo id or None, "revision": ...} of an adapter's recorded base: a repo id only when the
    base was not a local folder (``base_path`` is recorded for local bases)."""
    base = str(info.get("base") or "")
    if info.get("base_path") or not is_repo_id(base):
        return {"base_repo": None, "revision": None}
    repo, rev = split_revision(base)
    return {"base_repo": repo, "revision": info.get("base_revision") or rev}


def _training(folder: Path, facts: dict) -> dict | None:
    from calofm.training.record import RECORD

    if not (folder / RECORD).is_file():
        return None
    rec = read_json(folder / RECORD)
    energies = {}
    for src in (rec.get("config") or {}).get("data", {}).get("sources", []):
        if isinstance(src, dict) and src.get("energy"):
            energies[Path(str(src.get("geometry"))).stem] = src["energy"]
    cards = {g["name"]: g["card"] for g in facts["geometries"]}
    rows, generators = [], set()
    for name, entry in (rec.get("geometries") or {}).items():
        if not isinstance(entry, dict) or not all(isinstance(s, dict) for s in entry.get("sources", [])):
            raise ValueError(f"{folder / RECORD}: geometry entry '{name}' is malformed")
        data = []
        for s in entry.get("sources", []):
            generators.add(s.get("generator") or "")
            seed = f", seed {s['seed']}" if s.get("seed") is not None else ""
            data.append(f"{s.get('generator') or 'unknown generator'}{seed} (`{Path(str(s.get('file'))).name}`, "
                        f"{_num(s.get('rows'), ',')} rows)")
        card = cards.get(name)
        energy = energies.get(name) or (card.card.energy if card is not None else None)
        rows.append({"name": name, "train": _num(entry.get("train_showers"), ","),
                     "val": _num(entry.get("val_showers"), ","), "energy": _span(energy) if energy else "—",
                     "data": "; ".join(data) or "—", "range": energy})
    sim = sorted(g for g in generators if g.startswith("calofm-sim"))
    return {"rows": rows, "kind": KINDS.get(rec.get("kind"), facts["kind"]), "steps": _num(rec.get("steps"), ","),
            "batch_size": rec.get("batch_size"), "samples_seen": _num(rec.get("samples_seen"), ","),
            "processes": rec.get("processes", 1), "mixed_precision": rec.get("mixed_precision", "no"),
            "wall": _duration(rec.get("wall_seconds")), "resumed": rec.get("resumed_from_step"),
            "created": rec.get("created", "at an unrecorded time"), "version": rec.get("calofm_version", "?"),
            "simulated": ", ".join(sim) if sim and sim == sorted(g for g in generators) else None}


def _evaluation(metrics: Sequence[Path], names: set[str], complete: bool) -> tuple[list[dict], list[str], str]:
    """Rows of the evaluation table, sentences quoting it, and the metrics files it comes from."""
    from calofm.evaluation.summary import fidelity_row

    rows, quotes, sources = [], [], []
    for path in map(Path, metrics):
        data = read_json(path)
        if not isinstance(data.get("geometries"), dict) or not data["geometries"]:
            raise ValueError(f"{path}: not a metrics.json of calofm evaluate (no 'geometries' entries)")
        sources.append(f"`{'/'.join(Path(shown_path(path.absolute())).parts[-2:])}`")  # e.g. report/metrics.json
        for key, entry in data["geometries"].items():
            if not isinstance(entry, dict):
                raise ValueError(f"{path}: geometry entry '{key}' is not an object")
            name = str(entry.get("geometry", key))
            if complete and name not in names:
                raise ValueError(f"{path}: evaluates geometry '{name}', which this model does not generate "
                                 f"({', '.join(sorted(names))})")
            r = fidelity_row(entry)
            rows.append({"geometry": name, "n_reference": _num(entry.get("n_reference"), ","),
                         "n_generated": _num(entry.get("n_generated"), ","), "e_ratio": _num(r["e_ratio"], ".3f"),
                         "spread": _num(r["spread"], ".2f"), "auc_low": _num(r["auc_low"], ".3f"),
                         "auc_high": _num(r["auc_high"], ".3f"),
                         "fpd": f"{_num(r['fpd'], '.2f')} ({_num(r['fpd_floor'], '.2f')})",
                         "kpd": f"{_num(r['kpd'], '.3f')} ({_num(r['kpd_floor'], '.3f')})"})
            auc = [f", {label} classifier AUC {_num(r[k], '.3f')}" for k, label in
                   (("auc_low", "low-level"), ("auc_high", "high-level")) if not math.isnan(r[k])]
            quotes.append(f"Evaluated on `{name}` against {_num(entry.get('n_reference'), ',')} reference showers: "
                          f"mean visible-energy ratio {_num(r['e_ratio'], '.3f')}{''.join(auc)}"
                          + (" (0.5 = indistinguishable)." if auc else "."))
    return rows, quotes, ", ".join(sources)


def _usage(geometry: dict, trained) -> dict:
    """Conditions of the usage snippet inside the trained (else the card's) ranges: 10 and 100 GeV, theta pi/2
    and phi 0 where allowed."""
    card = geometry["card"].card if geometry["card"] is not None else None
    lo, hi = trained or (card.energy if card is not None else (10.0, 100.0))
    energies = [10.0, 100.0] if lo <= 10.0 and hi >= 100.0 else \
        [float(f"{lo * (hi / lo) ** f:.3g}") for f in (1 / 3, 2 / 3)]

    def inside(value, pair):
        return value if pair is None or pair[0] <= value <= pair[1] else round((pair[0] + pair[1]) / 2, 4)

    return {"geometry": geometry["name"], "energies": repr(energies),
            "theta": inside(1.5708, card.theta if card else None), "phi": inside(0.0, card.phi if card else None)}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def model_card(folder: Path, repo_id: str | None = None, metrics: Sequence[Path] = (), *,
               license: str = LICENSE) -> ModelCard:
    """The model card of a calofm model folder, full fine-tune or LoRA adapter folder. ``repo_id`` (ORG/NAME):
    where it is published, used by the usage snippet (else the folder path); ``metrics``: metrics.json files of
    ``calofm evaluate`` for the evaluation table."""
    folder = Path(folder)
    _check_repo_id(repo_id, folder)
    facts = read_folder(folder)
    kind, adapter = facts["kind"], facts["adapter"]
    training = _training(folder, facts)
    evaluation, quotes, sources = _evaluation(metrics, facts["names"], adapter is None or adapter["known"])
    first = facts["geometries"][0]
    trained = next((r["range"] for r in (training or {}).get("rows", []) if r["name"] == first["name"]), None)
    tags = [*MODEL_TAGS, *(["lora"] if kind == "lora" else [])]
    base_repo = adapter.get("base_repo") if adapter else None
    extra = {"base_model": base_repo, "base_model_relation": RELATIONS[kind]} if base_repo and kind in RELATIONS \
        else {}
    data = ModelCardData(license=license, library_name="calofm", tags=tags, **extra)
    names = ", ".join(g["name"] for g in facts["geometries"])
    spec = repo_id or shown_path(folder)
    return ModelCard.from_template(
        data, template_path=str(TEMPLATES / "model_card.md"), kind=kind, arch=facts["arch"], adapter=adapter,
        title=repo_id.split("/")[1] if repo_id else f"calofm {KINDS[kind]}: {names}",
        geometries=facts["geometries"], training=training,
        evaluation=evaluation, evaluation_quotes=quotes, evaluation_sources=sources,
        mesh=" x ".join(map(str, MESH_SHAPE)) + " (r x phi x z)", cells=math.prod(MESH_SHAPE),
        usage=_usage(first, trained), spec_py=json.dumps(spec), spec_cli=shlex.quote(spec), license=license)


def write_card(folder: Path, repo_id: str | None = None, metrics: Sequence[Path] = (), *,
               license: str = LICENSE) -> Path:
    """Write (or refresh) ``folder/README.md``, the model card, atomically; returns its path."""
    card = model_card(folder, repo_id, metrics, license=license)
    path = Path(folder) / "README.md"
    write_text_atomic(path, str(card).rstrip("\n") + "\n")
    return path


def dataset_card(files: Sequence[Path], repo_id: str, geometry=None, *, license: str = DATASET_LICENSE,
                 geometry_dirs=None) -> DatasetCard:
    """The dataset card of native shower files of one geometry, published as Parquet shards at ``repo_id``."""
    from calofm.cards import card_bytes, same_card
    from calofm.data.io import ShowerFile

    if not files:
        raise ValueError(f"{repo_id}: no shower files for the dataset card")
    _check_repo_id(repo_id, files[0])
    entries, geo = [], None
    for path in map(Path, files):
        with ShowerFile(path, geometry=geometry, geometry_dirs=geometry_dirs) as f:
            if f.geometry is None:
                raise ValueError(f"{path}: records no geometry with a card (give the geometry)")
            if geo is not None and (f.geometry.name != geo.name or not same_card(f.geometry, geo)):
                raise ValueError(f"{path}: geometry '{f.geometry.name}' differs from '{geo.name}' of {files[0]} "
                                 "(a dataset holds one geometry)")
            geo, cond = geo or f.geometry, f.conditions()
            entries.append({"name": path.name, "n": len(f), "attrs": f.attrs,
                            "energy": (float(cond["incident_energy"].min()) / 1e3,
                                       float(cond["incident_energy"].max()) / 1e3),
                            "theta": (float(cond["incident_theta"].min()), float(cond["incident_theta"].max())),
                            "phi": (float(cond["incident_phi"].min()), float(cond["incident_phi"].max()))})
    n = sum(e["n"] for e in entries)
    generators = sorted({e["attrs"].generator or "unknown" for e in entries})
    particles = sorted({e["attrs"].particle or geo.card.particle for e in entries})
    scales = sorted({e["attrs"].energy_scale for e in entries})
    bounds = {k: (min(e[k][0] for e in entries), max(e[k][1] for e in entries)) for k in ("energy", "theta", "phi")}
    size = next(label for limit, label in ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"),
                                           (1e6, "100K<n<1M"), (1e7, "1M<n<10M"), (math.inf, "10M<n<100M"))
                if n < limit)
    c = geo.card
    data = DatasetCardData(license=license, tags=[*DATASET_TAGS, geo.name], size_categories=[size],
                           pretty_name=f"{c.title}: {n:,} {'/'.join(particles)} showers")
    return DatasetCard.from_template(
        data, template_path=str(TEMPLATES / "dataset_card.md"), repo_id=repo_id, pretty_name=data.pretty_name,
        n_showers=f"{n:,}", particle=" and ".join(particles), energy_scale=" and ".join(scales),
        n_files=len(entries), energy=[_num(v) for v in bounds["energy"]],
        theta=[_num(v) for v in bounds["theta"]], phi=[_num(v) for v in bounds["phi"]],
        files=[{"name": e["name"], "showers": f"{e['n']:,}", "generator": e["attrs"].generator or "unknown",
                "seed": _num(e["attrs"].seed, "d"), "energy": _span(e["energy"])} for e in entries],
        simulated=", ".join(generators) if all(g.startswith("calofm-sim") for g in generators) else None,
        geometry={"name": geo.name, "title": c.title, "slot": geo.slot, "description": c.description.strip(),
                  "particle": c.particle, "threshold": _num(c.threshold), "X0": _num(geo.X0_eff, ".3g"),
                  "RM": _num(geo.R_M_eff, ".3g"), "dr": _num(c.mesh.dr), "dz": _num(c.mesh.dz),
                  "energy": _span(c.energy), "theta": _span(c.theta), "phi": _span(c.phi)},
        card_yaml=card_bytes(geo).decode().strip(), license=license)


def card_metadata_errors(card: ModelCard | DatasetCard, kind: str | None = None) -> list[str]:
    """What in a card's metadata breaks calofm's rules (empty: fine). ``kind`` ("pretrained", "lora", "full",
    "scratch", see ``folder_kind``) makes the base-model rule exact; without it an adapter is known by its tags."""
    data = card.data.to_dict()
    errors = []
    if not data.get("license"):
        errors.append("license is missing")
    dataset = isinstance(card, DatasetCard)
    tags = data.get("tags") or []
    missing = [t for t in (DATASET_TAGS if dataset else MODEL_TAGS) if t not in tags]
    if missing:
        errors.append(f"tags {', '.join(missing)} are missing")
    if not dataset:
        if data.get("library_name") != "calofm":
            errors.append(f"library_name is {data.get('library_name')!r}, not 'calofm'")
        base, relation = data.get("base_model"), data.get("base_model_relation")
        derived = kind in RELATIONS if kind is not None else ("lora" in tags or relation is not None)
        if derived and not base:
            errors.append("base_model is missing: an adapter or fine-tune names the Hub repo of its base model")
        for b in [base] if isinstance(base, str) else (base or []):
            if not isinstance(b, str) or not is_repo_id(b) or "@" in b:
                errors.append(f"base_model {b!r} is not a Hub repo id (ORG/NAME) but a local path or malformed")
        expected = RELATIONS.get(kind) if kind is not None else relation
        if (base and relation != expected) or relation not in (None, *RELATIONS.values()):
            errors.append(f"base_model_relation is {relation!r}, expected {expected!r}")
        if kind == "lora" and "lora" not in tags:
            errors.append("tag lora is missing (the card is of a LoRA adapter)")
    if _TOKEN.search(str(card)):
        errors.append("the card contains a Hugging Face token (hf_...): remove it")
    return errors
