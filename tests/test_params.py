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
