import logging
import os
import sys

import pytest

# Make ``from _mg_helpers import ...`` work whatever pytest's import mode is.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def mg_caplog(caplog, monkeypatch):
    """``caplog`` capturing WARNING and above from the ``minigun`` logger, even if the
    package switched propagation off."""
    logger = logging.getLogger("minigun")
    monkeypatch.setattr(logger, "propagate", True)
    caplog.set_level(logging.WARNING, logger="minigun")
    return caplog
