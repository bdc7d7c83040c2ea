import pytest

from mecha_core.plugins import reset_host


@pytest.fixture(autouse=True)
def _fresh_host(monkeypatch):
    """Each test discovers plugins anew, so environment variables set by a test apply."""
    reset_host()
    yield
    reset_host()
