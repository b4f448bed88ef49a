"""bench/lds's scripts loaded as modules, for the tests of their measures (the scripts import
their siblings by name, so their folder goes on sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.support import ROOT

LDS_DIR = ROOT / "bench" / "lds"


def load_lds_script(name: str) -> ModuleType:
    """bench/lds/{name}.py as a module (registered in sys.modules: dataclasses look it up)."""
    if str(LDS_DIR) not in sys.path:
        sys.path.insert(0, str(LDS_DIR))
    spec = importlib.util.spec_from_file_location(f"bench_lds_{name}", LDS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
