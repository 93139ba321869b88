"""calofm.config: strict dataclass filling, command-line overrides and defaults <- YAML <- overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from calofm.config import ConfigError, build, from_dict, load_yaml, merge, parse_overrides, to_dict


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Layer:
    width: int
    name: str = ""


@dataclass
class Recipe:
    steps: int = 100
    amp: bool = False
    seed: int | None = None
    out: Path = Path("runs")
    tags: list[str] = field(default_factory=list)
    sizes: tuple[int, ...] = (1, 2)
    optim: Optim = field(default_factory=Optim)
    layers: list[Layer] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class NeedsData:
    data: str  # required: no default
    steps: int = 10


@dataclass(frozen=True)
class Positive:
    value: float = 1.0

    def __post_init__(self):
        if self.value <= 0:
            raise ValueError("value must be > 0")


# ----------------------------------------------------------------------------------------------
# from_dict
# ----------------------------------------------------------------------------------------------


def test_from_dict_fills_nested_types_and_converts_losslessly():
    cfg = from_dict(Recipe, {
        "steps": 5, "seed": 3, "out": "x/y", "tags": ["a"], "sizes": [4, 5, 6],
        "optim": {"lr": 1, "betas": [0, 1]}, "layers": [{"width": 8}], "weights": {"odd": 2},
    })
    assert cfg.optim == Optim(lr=1.0, betas=(0.0, 1.0))
    assert type(cfg.optim.lr) is float and all(type(b) is float for b in cfg.optim.betas)  # int -> float
    assert cfg.sizes == (4, 5, 6) and isinstance(cfg.sizes, tuple)  # a YAML list becomes the annotated tuple
    assert cfg.out == Path("x/y") and cfg.layers == [Layer(width=8)] and cfg.weights == {"odd": 2.0}
    assert from_dict(Recipe, {}) == Recipe()  # every field has a default


def test_unknown_key_is_an_error_listing_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"Recipe: unknown key\(s\) \['stpes'\]; allowed: .*'steps'"):
        from_dict(Recipe, {"stpes": 3})
    with pytest.raises(ConfigError, match=r"Recipe\.optim: unknown key\(s\) \['momentum'\]"):
        from_dict(Recipe, {"optim": {"momentum": 0.9}})


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match="missing required key 'width'"):
        from_dict(Recipe, {"layers": [{"name": "x"}]})
    with pytest.raises(ConfigError, match="NeedsData: missing required key 'data'"):
        from_dict(NeedsData, {})


@pytest.mark.parametrize(("data", "where"), [
    ({"steps": "100"}, r"Recipe\.steps: expected an integer"),
    ({"steps": 1.5}, r"Recipe\.steps: expected an integer"),
    ({"steps": 2.0}, r"Recipe\.steps: expected an integer"),  # no silent float -> int
    ({"steps": True}, r"Recipe\.steps: expected an integer"),  # bool is an int in Python, not in a config
    ({"amp": 1}, r"Recipe\.amp: expected true/false"),
    ({"amp": "yes"}, r"Recipe\.amp: expected true/false"),
    ({"optim": {"lr": True}}, r"Recipe\.optim\.lr: expected a number"),
    ({"optim": {"lr": "1e-3"}}, r"Recipe\.optim\.lr: expected a number"),
    ({"optim": {"lr": None}}, r"Recipe\.optim\.lr: expected a number"),
    ({"optim": 3}, r"Recipe\.optim: expected a mapping for Optim"),
    ({"optim": {"schedule": "linear"}}, r"Recipe\.optim\.schedule: 'linear' is not one of \['cosine', 'constant'\]"),
    ({"optim": {"betas": [0.9]}}, r"Recipe\.optim\.betas: expected 2 values, got 1"),
    ({"optim": {"betas": [0.9, 0.99, 0.999]}}, r"Recipe\.optim\.betas: expected 2 values, got 3"),
    ({"optim": {"betas": [0.9, "x"]}}, r"Recipe\.optim\.betas\[1\]: expected a number"),
    ({"optim": {"betas": 0.9}}, r"Recipe\.optim\.betas: expected a list"),
    ({"sizes": [1, 2.5]}, r"Recipe\.sizes\[1\]: expected an integer"),
    ({"tags": "a"}, r"Recipe\.tags: expected a list"),
    ({"tags": [1]}, r"Recipe\.tags\[0\]: expected a string"),
    ({"seed": "3"}, r"Recipe\.seed: '3' does not match"),
    ({"seed": True}, r"Recipe\.seed: True does not match"),
    ({"out": 3}, r"Recipe\.out: expected a path"),
    ({"layers": [{"width": "8"}]}, r"Recipe\.layers\[0\]\.width: expected an integer"),
    ({"weights": {"odd": "x"}}, r"Recipe\.weights\.odd: expected a number"),
    ({"weights": [1]}, r"Recipe\.weights: expected a mapping"),
])
def test_wrong_types_are_rejected_with_the_field_path(data, where):
    with pytest.raises(ConfigError, match=where):
        from_dict(Recipe, data)


def test_optional_accepts_none_and_checks_the_inner_type():
    assert from_dict(Recipe, {"seed": None}).seed is None
    assert from_dict(Recipe, {"seed": 7}).seed == 7


def test_post_init_errors_become_config_errors_naming_the_place():
    with pytest.raises(ConfigError, match=r"^here: value must be > 0$"):
        from_dict(Positive, {"value": -1}, where="here")


def test_from_dict_needs_a_mapping():
    with pytest.raises(ConfigError, match="Recipe: expected a mapping, got list"):
        from_dict(Recipe, [1, 2])


recipes = st.builds(
    Recipe,
    steps=st.integers(-10**6, 10**6),
    amp=st.booleans(),
    seed=st.none() | st.integers(0, 2**31),
    out=st.from_regex(r"[a-z]{1,5}(/[a-z]{1,5}){0,2}", fullmatch=True).map(Path),
    tags=st.lists(st.text(max_size=5), max_size=3),
    sizes=st.lists(st.integers(), max_size=4).map(tuple),
    optim=st.builds(Optim, lr=st.floats(allow_nan=False), betas=st.tuples(st.floats(0, 1), st.floats(0, 1)),
                    schedule=st.sampled_from(["cosine", "constant"])),
    layers=st.lists(st.builds(Layer, width=st.integers(1, 64), name=st.text(max_size=4)), max_size=3),
    weights=st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0, 10), max_size=3),
)


@settings(max_examples=60, deadline=None)
@given(recipes)
def test_to_dict_from_dict_and_yaml_round_trip(cfg):
    plain = to_dict(cfg)
    assert from_dict(Recipe, plain) == cfg
    assert from_dict(Recipe, yaml.safe_load(yaml.safe_dump(plain))) == cfg  # plain data survives YAML


# ----------------------------------------------------------------------------------------------
# parse_overrides
# ----------------------------------------------------------------------------------------------


def test_overrides_nest_dotted_keys_and_accept_both_spellings():
    assert parse_overrides(["--optim.lr", "3e-4", "--steps=10", "--optim.betas", "[0.8, 0.9]", "--out=a=b"]) == {
        "optim": {"lr": 3e-4, "betas": [0.8, 0.9]}, "steps": 10, "out": "a=b",  # only the first '=' splits
    }
    assert parse_overrides(["--log-every", "5"]) == {"log_every": 5}  # dashes in keys are underscores
    assert parse_overrides([]) == {}


@pytest.mark.parametrize(("text", "value"), [
    ("3", 3), ("-2", -2), ("0.5", 0.5), (".5", 0.5), ("1e-3", 1e-3), ("5E4", 5e4), ("-1e+2", -100.0),
    ("2.5e-3", 2.5e-3), ("true", True), ("false", False), ("null", None), ("none", None), ("None", None),
    ("~", None), ("[1, 2]", [1, 2]), ("{a: 1}", {"a": 1}), ("cosine", "cosine"), ("runs/1e-3", "runs/1e-3"),
    ("'3'", "3"), ('"none"', "none"), ("'1e-3'", "1e-3"),  # quoted values stay strings
    ("nan", "nan"), (".nan", pytest.approx(float("nan"), nan_ok=True)), (".inf", float("inf")),
])
def test_override_values_are_typed_as_yaml(text, value):
    parsed = parse_overrides(["--x", text])["x"]
    assert parsed == value
    assert type(parsed) is type(value) or isinstance(value, type(pytest.approx(0)))


def test_1e_minus_3_is_a_float_not_a_string():
    # YAML 1.1 (PyYAML) reads "1e-3" as a string; a learning rate written that way must still be a number
    assert yaml.safe_load("1e-3") == "1e-3"
    assert parse_overrides(["--lr", "1e-3"]) == {"lr": 0.001}
    assert isinstance(parse_overrides(["--lr=1e-3"])["lr"], float)


@pytest.mark.parametrize(("args", "match"), [
    (["--steps"], "override --steps: missing value"),
    (["--steps", "--amp", "true"], "override --steps: missing value"),
    (["steps", "3"], "override 'steps': expected --key value"),
    (["--", "3"], "override '--': expected --key value"),
    (["-s", "3"], "override '-s': expected --key value"),
    (["--a", "1", "--a.b", "2"], "override --a.b: conflicts with another override"),
])
def test_malformed_overrides_are_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        parse_overrides(args)


def test_a_later_override_of_the_same_key_wins():
    assert parse_overrides(["--steps", "1", "--steps=2"]) == {"steps": 2}


keys = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)
words = st.from_regex(r"[a-z][a-z0-9_/]{0,8}", fullmatch=True).filter(
    lambda s: yaml.safe_load(s) == s and s.lower() not in ("none", "null"))
scalars = st.integers(-10**9, 10**9) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans() | words


def _render(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.lists(keys, min_size=1, max_size=3).map(tuple), scalars, max_size=5), st.booleans())
def test_overrides_round_trip_any_nested_scalars(flat, with_equals):
    # drop key paths that are prefixes of others (--a 1 --a.b 2 is a conflict, tested above)
    flat = {k: v for k, v in flat.items() if not any(o != k and o[: len(k)] == k for o in flat)}
    args = []
    for path, value in flat.items():
        key = "--" + ".".join(path)
        args += [f"{key}={_render(value)}"] if with_equals else [key, _render(value)]
    expected: dict = {}
    for path, value in flat.items():
        node = expected
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    assert parse_overrides(args) == expected


def test_merge_is_recursive_and_does_not_mutate():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert merge(base, {"a": {"b": 9}, "e": 4}) == {"a": {"b": 9, "c": 2}, "d": 3, "e": 4}
    assert base == {"a": {"b": 1, "c": 2}, "d": 3}
    assert merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}  # a scalar replaces a mapping


# ----------------------------------------------------------------------------------------------
# build and YAML files
# ----------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_build_precedence_defaults_then_yaml_then_overrides(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "steps: 50\noptim:\n  lr: 0.01\n  schedule: constant\n")
    assert build(Recipe) == Recipe()
    from_yaml = build(Recipe, recipe)
    assert from_yaml.steps == 50 and from_yaml.optim == Optim(lr=0.01, schedule="constant")  # betas default kept
    cfg = build(Recipe, recipe, ["--optim.lr", "1e-4", "--amp", "true"])
    assert cfg.steps == 50 and cfg.amp is True  # YAML kept where not overridden
    assert cfg.optim == Optim(lr=1e-4, betas=(0.9, 0.999), schedule="constant")
    assert build(Recipe, None, ["--steps=7"]) == dataclasses.replace(Recipe(), steps=7)


def test_build_works_for_configs_with_required_fields(tmp_path):
    assert build(NeedsData, _write(tmp_path / "n.yaml", "data: a.h5\n")) == NeedsData(data="a.h5")
    assert build(NeedsData, None, ["--data", "b.h5", "--steps", "3"]) == NeedsData(data="b.h5", steps=3)
    with pytest.raises(ConfigError, match="NeedsData: missing required key 'data'"):
        build(NeedsData)


def test_build_errors_name_the_file(tmp_path):
    bad_key = _write(tmp_path / "bad_key.yaml", "stepz: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad_key}: unknown key\(s\) \['stepz'\]"):
        build(Recipe, bad_key)
    recipe = _write(tmp_path / "ok.yaml", "steps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{recipe}\.optim\.lr: expected a number, got 'fast'"):
        build(Recipe, recipe, ["--optim.lr", "fast"])
    with pytest.raises(ConfigError, match=rf"^{recipe}: unknown key\(s\) \['nope'\]"):
        build(Recipe, recipe, ["--nope", "1"])
    nested = _write(tmp_path / "nested.yaml", "layers:\n  - {width: 4}\n  - {width: four}\n")
    with pytest.raises(ConfigError, match=rf"^{nested}\.layers\[1\]\.width: expected an integer"):
        build(Recipe, nested)


def test_load_yaml_errors_name_the_file_on_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
        load_yaml(tmp_path / "missing.yaml")
    broken = _write(tmp_path / "broken.yaml", "steps: [1, 2\nlr: 3\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML") as err:
        load_yaml(broken)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a YAML mapping at top level"):
        load_yaml(_write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert load_yaml(_write(tmp_path / "empty.yaml", "")) == {}
    assert build(Recipe, tmp_path / "empty.yaml") == Recipe()


# ----------------------------------------------------------------------------------------------
# Range checks of the training and adaptation configs (YAML, command line and assignment alike)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, match",
    [
        ("steps: 0\n", "steps must be >= 1, got 0"),
        ("batch_size: -4\n", "batch_size must be >= 1"),
        ("seed: -1\n", r"seed must be in \[0, 4294967295\]"),
        ("seed: 1180591620717411303424\n", "seed must be in"),  # 2**70
        ("ema_decay: 1.0\n", r"ema_decay must be in \[0, 1\)"),
        ("optim: {lr: .nan}\n", "optim.lr must be a finite number"),
        ("optim: {lr: -0.001}\n", r"optim.lr must be in \(0, 1\]"),
        ("optim: {betas: [0.9, 1.0]}\n", r"optim.betas\[1\] must be in"),
        ("optim: {warmup_steps: -1}\n", "optim.warmup_steps must be >= 0"),
        ("optim: {grad_clip: .inf}\n", "optim.grad_clip must be a finite number"),
        ("keep_checkpoints: 0\n", "keep_checkpoints must be >= 1"),
        ("preprocess: {eps: 0.0}\n", r"preprocess.eps must be in \(0, inf\)"),
        ("model: {cond_dropout: 1.5}\n", "model.cond_dropout must be in"),
        ("data: {num_workers: -1}\n", "data.num_workers must be in"),
        ("data: {sources: [{geometry: odd, samples: 0}]}\n", "samples must be >= 1"),
        ("data: {sources: [{geometry: odd, weight: .nan}]}\n", "weight must be a finite number"),
        ("data: {sources: [{geometry: odd, energy: [50, 5]}]}\n", "need lo <= hi"),
        ("data: {sources: [{geometry: odd, slot: -2}]}\n", "slot must be >= 0"),
    ],
)
def test_training_config_numbers_are_range_checked_and_the_error_names_the_file(tmp_path, text, match):
    from calofm.training.config import TrainConfig

    path = _write(tmp_path / "recipe.yaml", text)
    with pytest.raises(ConfigError, match=rf"^{path}.*{match}"):
        build(TrainConfig, path)


def test_assignments_after_construction_are_checked_and_a_rejected_one_changes_nothing():
    from calofm.training.config import SourceConfig, TrainConfig

    cfg = TrainConfig()
    with pytest.raises(ValueError, match="steps must be >= 1"):
        cfg.steps = 0
    assert cfg.steps == 1200
    with pytest.raises(ValueError, match="optim.lr must be a finite number"):
        cfg.optim.lr = float("nan")
    assert cfg.optim.lr == 2e-3
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        cfg.grad_accum = 7
    cfg.steps = 10  # a valid change is kept
    assert cfg.steps == 10
    cfg.data.sources.append(SourceConfig(geometry="odd"))  # a list changes without an assignment ...
    cfg.data.sources[-1].__dict__["samples"] = 0  # ... and so can a field, bypassing the check
    with pytest.raises(ValueError, match="samples must be >= 1"):
        cfg.validate()  # which the training loop runs again before it starts


def test_adapt_config_numbers_are_range_checked(tmp_path):
    from calofm.adapt import AdaptConfig

    for bad, match in ((dict(rank=0), "rank must be in"), (dict(steps=0), "steps must be in"),
                       (dict(lr=float("nan")), "lr must be a finite number"), (dict(lr=-1.0), "lr must be in"),
                       (dict(batch_size=0), "batch_size must be in"), (dict(seed=2**40), "seed must be in"),
                       (dict(val_samples=-1), "val_samples must be >= 0"), (dict(alpha=0.0), "alpha must be in")):
        with pytest.raises(ValueError, match=match):
            AdaptConfig(geometry="cld", **bad)
    a = AdaptConfig(geometry="cld")
    with pytest.raises(ValueError, match="rank must be in"):
        a.rank = 0
    assert a.rank == 32  # the rejected assignment left the default
    with pytest.raises(ValueError, match="--merge applies to LoRA"):
        a.from_scratch, a.merge = True, True
    path = _write(tmp_path / "adapt.yaml", "geometry: cld\nsteps: 0\n")
    with pytest.raises(ConfigError, match=rf"^{path}: steps must be in"):
        build(AdaptConfig, path)
