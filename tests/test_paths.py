from pathlib import Path

from lightning_bayes.paths import lightning_bayes_home


def test_the_home_folder_is_the_variable_or_the_cache_and_an_empty_variable_is_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("LIGHTNING_BAYES_HOME", str(tmp_path))
    assert lightning_bayes_home() == tmp_path
    monkeypatch.setenv("LIGHTNING_BAYES_HOME", "")  # was the working folder
    assert lightning_bayes_home() == Path.home() / ".cache" / "lightning_bayes"
    monkeypatch.delenv("LIGHTNING_BAYES_HOME")
    assert lightning_bayes_home() == Path.home() / ".cache" / "lightning_bayes"
