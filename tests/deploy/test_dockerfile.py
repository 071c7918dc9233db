"""deploy/docker/Dockerfile: hadolint finds nothing (and every inline ignore is needed), the cpu
and cuda targets are built the way the project builds (same packages as scripts/install-deps.sh,
scripts/build.sh, the bundled model), run unprivileged as the Kubernetes manifests expect, and
the build context keeps local build trees out. No Docker engine is needed: the one piece of the
build that depends on the machine, deploy/docker/runtime-packages.sh, runs here against the
local build of cleave.
"""
import os
import re
import shutil
import subprocess

import pytest
import yaml

from deploylib import DOCKERFILE, ROOT, cleave_bin, tool

DOCKER = ROOT / "deploy" / "docker"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"


def hadolint(path):
    return subprocess.run([tool("hadolint"), "--no-color", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_hadolint_finds_nothing():
    out = hadolint(DOCKERFILE)
    findings = yaml.safe_load(out.stdout) if out.stdout.strip() else []
    assert out.returncode == 0 and not findings, f"hadolint:\n{out.stdout}{out.stderr}"


def test_every_hadolint_ignore_is_needed(tmp_path):
    """Dropping any one `# hadolint ignore=RULE` line makes hadolint report RULE on the next line."""
    lines = DOCKERFILE.read_text().splitlines(keepends=True)
    ignores = [(i, m.group(1)) for i, l in enumerate(lines) if (m := re.match(r"#\s*hadolint ignore=(\S+)", l))]
    for i, rules in ignores:
        trial = tmp_path / "Dockerfile"
        trial.write_text("".join(lines[:i] + lines[i + 1:]))
        findings = yaml.safe_load(hadolint(trial).stdout) or []
        # Line numbers are 1-based; the instruction that followed the comment is now at i + 1.
        reported = {f["code"] for f in findings if f["line"] == i + 1}
        assert set(rules.split(",")) <= reported, (
            f"line {i + 1}: '# hadolint ignore={rules}' suppresses nothing there ({reported})")


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\n")
    assert hadolint(bad).returncode != 0


def stages():
    """[(name, base image with ARG defaults substituted)] in order."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args = dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', text.split("\nFROM ", 1)[0], re.M))
    out = []
    for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.M):
        out.append((name, re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)))
    return out


def stage_text(name):
    text = DOCKERFILE.read_text()
    parts = re.split(r"^(?=FROM )", text, flags=re.M)
    found = [p for p in parts if re.match(rf"FROM\s+\S+\s+AS\s+{re.escape(name)}\s*$", p.splitlines()[0])]
    assert len(found) == 1, name
    return found[0]


def test_cpu_and_cuda_targets_from_pinned_bases():
    s = dict(stages())
    assert {"build-cpu", "build-cuda", "cpu", "cuda"} <= set(s), s
    assert s["build-cpu"] == "debian:12" and s["cpu"] == "debian:12-slim", s
    cuda = re.compile(r"nvidia/cuda:(\d+)\.(\d+)\.(\d+)-(devel|runtime)-ubuntu\d\d\.\d\d")
    dev, run = cuda.fullmatch(s["build-cuda"]), cuda.fullmatch(s["cuda"])
    assert dev and dev.group(4) == "devel", s["build-cuda"]
    assert run and run.group(4) == "runtime", s["cuda"]
    assert dev.groups()[:3] == run.groups()[:3], "build and runtime CUDA versions differ"
    assert int(dev.group(1)) >= 13, "the project builds against CUDA 13"
    for name, base in s.items():
        assert ":" in base and not base.endswith(":latest"), f"{name}: pin the base image ({base})"


@pytest.mark.parametrize("target,build", [("cpu", "build-cpu"), ("cuda", "build-cuda")])
def test_runtime_stage(target, build):
    text = stage_text(target)
    assert re.search(r'^ENTRYPOINT \["cleave"\]\s*$', text, re.M), target
    assert re.search(r"^USER 10001:10001\s*$", text, re.M), f"{target}: run as the unprivileged uid"
    assert f"COPY --from={build} /out/bin/cleave /usr/local/bin/cleave" in text
    assert f"COPY --from={build} /out/models /opt/cleave/models" in text
    assert f"xargs -a /tmp/runtime-packages" in text, f"{target}: install the libraries cleave links"
    assert "useradd --system --uid 10001" in text
    # The build stage builds the project's way.
    btext = stage_text(build)
    assert "deploy/docker/build-stage.sh" in btext
    assert ("-DCLEAVE_CUDA=ON" if target == "cuda" else "-DCLEAVE_CUDA=OFF") in btext


def test_build_stage_script_uses_the_project_scripts():
    script = (DOCKER / "build-stage.sh").read_text()
    for needed in ("scripts/build.sh", "scripts/setup-model.sh", "deploy/docker/runtime-packages.sh",
                   "$OUT/bin/cleave", "models/stories260K"):
        assert needed in script, needed
    for f in ("build-stage.sh", "runtime-packages.sh"):
        assert os.access(DOCKER / f, os.X_OK), f"{f} must be executable"
    out = subprocess.run(["bash", "-n", str(DOCKER / "build-stage.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def install_deps_packages():
    text = (ROOT / "scripts" / "install-deps.sh").read_text()
    block = re.search(r"DEB_PACKAGES=\((.*?)\n\)", text, re.S).group(1)
    return {w for line in block.splitlines() for w in line.split("#")[0].split()}


def test_build_packages_are_install_deps_packages():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    pkgs = set(re.search(r'^ARG BUILD_PACKAGES="([^"]*)"', text, re.M).group(1).split())
    assert pkgs, "no BUILD_PACKAGES"
    extra = pkgs - install_deps_packages()
    assert not extra, f"the image builds with packages scripts/install-deps.sh does not install: {extra}"
    # Everything CMake requires (cmake/CleaveDeps.cmake) is among them.
    for p in ("libabsl-dev", "libgrpc++-dev", "libyaml-cpp-dev", "libopenblas-dev", "libgtest-dev",
              "libbenchmark-dev", "libcli11-dev", "nlohmann-json3-dev", "protobuf-compiler-grpc", "curl"):
        assert p in pkgs, p


def runtime_packages(binary, env=None):
    return subprocess.run(["bash", str(DOCKER / "runtime-packages.sh"), binary], capture_output=True, text=True,
                          timeout=60, env=env)


def need_dpkg_and_binary():
    binary = cleave_bin()
    if binary is None:
        pytest.skip("no cleave binary built (set CLEAVE_BIN or build into build/)")
    if shutil.which("dpkg-query") is None:
        pytest.skip("not a Debian-family machine")
    return binary


def test_runtime_packages_of_the_local_build():
    binary = need_dpkg_and_binary()
    out = runtime_packages(binary)
    assert out.returncode == 0, out.stderr
    pkgs = out.stdout.split()
    assert "libc6" in pkgs and any(p.startswith("libgrpc++") for p in pkgs) and any(
        p.startswith("libyaml-cpp") for p in pkgs), pkgs
    for p in pkgs:
        st = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        assert "install ok installed" in st.stdout, f"{p} is not an installed package"


def test_runtime_packages_fails_on_a_library_no_package_owns(tmp_path):
    """A library outside the package manager (here a copy on LD_LIBRARY_PATH) must stop the
    build rather than leave the runtime image without it."""
    binary = need_dpkg_and_binary()
    libs = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    yaml_cpp = re.search(r"(libyaml-cpp\.so\S*) => (\S+)", libs)
    assert yaml_cpp, libs
    shutil.copy(yaml_cpp.group(2), tmp_path / yaml_cpp.group(1))
    out = runtime_packages(binary, env={**os.environ, "LD_LIBRARY_PATH": str(tmp_path)})
    assert out.returncode != 0 and "no package owns" in out.stderr, (out.stdout, out.stderr)


def dockerignore_excludes(path):
    """Whether the build context leaves out `path` (Docker's rules: patterns match the path or a
    parent folder, `**` spans folders, `!` re-includes, the last matching pattern wins)."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for raw in DOCKERIGNORE.read_text().splitlines():
        pat = raw.strip()
        if not pat or pat.startswith("#"):
            continue
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        rx = "".join(".*" if tok == "**" else "[^/]*" if tok == "*" else "[^/]" if tok == "?" else re.escape(tok)
                     for tok in re.findall(r"\*\*|\*|\?|[^*?]+", pat))
        if any(re.fullmatch(rx, p) for p in prefixes):
            excluded = not negate
    return excluded


@pytest.mark.parametrize("path", [".git/HEAD", ".venv/bin/python", "build/bin/cleave", "build-asan/CMakeCache.txt",
                                  "tests/e2e/__pycache__/x.pyc", ".cache/other/file"])
def test_context_leaves_out(path):
    assert dockerignore_excludes(path), path


@pytest.mark.parametrize("path", ["CMakeLists.txt", "scripts/build.sh", "scripts/setup-model.sh",
                                  "deploy/docker/build-stage.sh", "deploy/docker/runtime-packages.sh",
                                  "models/stories260K/config.json", ".cache/stories260K/stories260K.bin",
                                  "tests/CMakeLists.txt", "configs/local.yaml", "kernels/cpu/x.cc"])
def test_context_keeps(path):
    assert not dockerignore_excludes(path), path


def test_requirements_agree_with_the_e2e_ones():
    """Both files install into the same .venv: a package pinned in both must have one version."""
    def pins(p):
        return dict(l.split("#")[0].strip().split("==") for l in p.read_text().splitlines() if l.split("#")[0].strip())
    deploy, e2e = pins(ROOT / "tests/deploy/requirements.txt"), pins(ROOT / "tests/e2e/requirements.txt")
    clash = {k: (deploy[k], e2e[k]) for k in deploy.keys() & e2e.keys() if deploy[k] != e2e[k]}
    assert not clash, clash
    assert "tests/deploy/requirements.txt" in (ROOT / "scripts" / "install-deps.sh").read_text()
