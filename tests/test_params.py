import pytest

from cnkit import params


def test_profile_auto_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CNKIT_PROFILE", "smoke")
    assert params.resolve_profile("auto") == "smoke"
    assert params.resolve_profile("full") == "full"
    monkeypatch.delenv("CNKIT_PROFILE")
    assert params.resolve_profile("auto") == "full"
    monkeypatch.setenv("CNKIT_PROFILE", "fast")
    with pytest.raises(ValueError, match="CNKIT_PROFILE"):
        params.resolve_profile("auto")


@pytest.mark.parametrize("value, kind, expected", [
    (1, float, 1.0), ("1e-5", float, 1e-5), (2.0, int, 2), ("3", int, 3), ("true", bool, True),
    (0, bool, False), ("x", str, "x"),
])
def test_coerce_accepts_what_papermill_passes(value, kind, expected):
    out = params.coerce("p", value, kind)
    assert out == expected and type(out) is kind


@pytest.mark.parametrize("value, kind", [(2.5, int), ("many", int), ("maybe", bool), (True, float), (None, int)])
def test_coerce_rejects_nonsense_naming_the_parameter(value, kind):
    with pytest.raises(ValueError, match="parameter steps must be"):
        params.coerce("steps", value, kind)


def test_coerce_bounds():
    with pytest.raises(ValueError, match="at least 1"):
        params.coerce("batch_size", 0, int, minimum=1)


def test_the_smoke_profile_says_what_it_overrides(capsys):
    from cnkit.experiments import configs

    used = params.profile_values("smoke", n_eval=(2, 32), seeds=([0], [0, 1, 2]), unchanged=(1, 1))
    assert used == {"n_eval": 2, "seeds": [0], "unchanged": 1}
    said = capsys.readouterr().out
    assert "n_eval=2 (parameter: 32)" in said and "seeds=[0] (parameter: [0, 1, 2])" in said and "unchanged" not in said
    assert params.profile_values("full", n_eval=(2, 32)) == {"n_eval": 32} and not capsys.readouterr().out
    params.say_overrides("smoke", configs.run_config(True, steps=600), configs.run_config(False, steps=600))
    said = capsys.readouterr().out
    assert "steps=4 (parameter: 600)" in said and "batch_size=4 (parameter: 32)" in said
    assert "validation_steps=2 (parameter: 20)" in said
