import pytest

from jaxmlp.data import load_dataset


@pytest.fixture(scope="session")
def names_data():
    """The bundled names file, block_size 3 (loaded once per session)."""
    return load_dataset()
