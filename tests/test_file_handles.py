"""Every file the package opens is closed again, on success and on every error path
(the suite runs with warnings as errors, so a leak elsewhere fails some test, but
not necessarily the one that leaked: these name the culprit)."""

import gc
import pickle
import warnings

import numpy as np
import pytest

from conv3d_cli.errors import WeightsError
from conv3d_cli.weights import load_weights


def _leaks(call):
    """ResourceWarnings (unclosed files) raised while ``call()`` runs and is collected."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            call()
        except WeightsError:
            pass
        gc.collect()
    return [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("name,content", [
    ("good.npz", None),
    ("good.npy", None),
    ("truncated.npz", b"PK\x03\x04 truncated"),
    ("garbage.npy", b"\x93NUMPY garbage"),
    ("pickled.npy", pickle.dumps([1, 2])),
    ("names.npz", "other"),
    ("object.npy", "object"),
])
def test_load_weights_closes_its_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None and name.endswith(".npz"):
        np.savez(path, kernel=np.zeros((1, 1, 1, 1, 2)), bias=np.zeros(2))
    elif content is None:
        np.save(path, np.zeros((1, 1, 1, 1, 2)))
    elif content == "other":
        np.savez(path, weights=np.zeros(3))
    elif content == "object":
        np.save(path, np.array([None], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    assert _leaks(lambda: load_weights(path)) == []
