"""The tutorial's example pipeline: step services (`services`) and step trees (`catalog.yaml`)."""

from importlib.resources import files
from pathlib import Path


def catalog_path() -> Path:
    """The path of the bundled `catalog.yaml` (for `aetr apply -f`)."""
    return Path(str(files("aetr.examples").joinpath("catalog.yaml")))
