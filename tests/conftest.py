import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repo, for `import lib`
sys.path.insert(0, str(Path(__file__).resolve().parent))       # tests/, for `import helpers`


@pytest.fixture
def cfg_of():
    """Build a validated train.py config from overrides (no files)."""
    from lib import config

    def make(*overrides, schema=config.Config):
        return config.load(schema, None, list(overrides))
    return make
