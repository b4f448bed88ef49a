"""The committed generated code matches protos/ (regenerate with scripts/gen_protos.sh)."""

from __future__ import annotations

import filecmp
import subprocess
import sys

from tests.support import ROOT


def test_generated_code_is_current(tmp_path):
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        capture_output=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    for package in ("v1", "internal/v1"):
        fresh, committed = tmp_path / "influence" / package, ROOT / "services" / "gen" / "influence" / package
        names = sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
        assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
        _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
        assert not mismatch and not errors, f"stale generated code: {mismatch or errors}; run scripts/gen_protos.sh"


def test_every_service_method_is_implemented():
    from services.factor_svc.servicer import FactorServicer
    from services.gen.influence.v1 import factor_service_pb2, gradient_service_pb2, query_service_pb2
    from services.gradient_svc.servicer import GradientServicer
    from services.query_svc.servicer import QueryServicer

    for module, service, implementation in (
        (factor_service_pb2, "FactorService", FactorServicer),
        (gradient_service_pb2, "GradientService", GradientServicer),
        (query_service_pb2, "QueryService", QueryServicer),
    ):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            assert method.name in implementation.__dict__, f"{service}.{method.name} is not implemented"


def test_api_passes_buf_lint_and_has_no_breaking_change_since_the_release(tmp_path):
    """scripts/check_api.sh: `buf lint` (buf.yaml) and `buf breaking` against the released API image
    protos/released/influence-v1.binpb (installed by scripts/install/buf.sh)."""
    checked = subprocess.run(
        ["bash", str(ROOT / "scripts" / "check_api.sh")],
        capture_output=True,
        text=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
