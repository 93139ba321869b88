"""The built-in geometry cards ship as package data (importlib.resources), not under sys.prefix/share."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from calofm.geometry import available_geometries, builtin_dir, load_geometry

REPO = Path(__file__).parent.parent


def test_builtin_cards_are_package_data_found_with_importlib_resources():
    cards = importlib.resources.files("calofm") / "geometries"
    names = sorted(p.name for p in cards.iterdir() if p.name.endswith(".yaml"))
    assert names == [f"{n}.yaml" for n in sorted(available_geometries())]  # what load_geometry finds, nothing else
    assert Path(str(cards)).resolve() == builtin_dir()
    assert load_geometry("odd").source == builtin_dir() / "odd.yaml"
    # the wheel takes them as package data; the repository keeps geometries/ at the top as the source of truth
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"geometries/*.yaml"' in pyproject and "data-files" not in pyproject
    # so do the model/dataset card templates of hub/ (calofm/hub/templates links there)
    assert '"hub/templates/*.md"' in pyproject
    assert (importlib.resources.files("calofm") / "hub" / "templates" / "model_card.md").is_file()
    assert (importlib.resources.files("calofm") / "py.typed").is_file()
    repo_cards = REPO / "geometries"
    assert builtin_dir() == repo_cards.resolve()
