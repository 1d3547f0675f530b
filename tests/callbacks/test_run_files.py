"""Run files never overwrite: name.json, name-1.json, ..."""

import json

from lightning_bayes.callbacks.run_files import unique_path, write_json


def test_write_json_never_overwrites(tmp_path):
    first = write_json(tmp_path / "run", "metrics", {"acc": 1.0})
    second = write_json(tmp_path / "run", "metrics", {"acc": 0.5})
    assert (first.name, second.name) == ("metrics.json", "metrics-1.json")
    assert json.loads(first.read_text()) == {"acc": 1.0} and json.loads(second.read_text()) == {"acc": 0.5}
    assert unique_path(tmp_path / "run", "metrics", ".json").name == "metrics-2.json"
    assert unique_path(tmp_path / "run", "plot", ".png").name == "plot.png"
