"""Dockerfile checks without a Docker engine: plain parsing of the instructions.

Non-root user with uid 1000, port 7860, a Python HEALTHCHECK, GRADIO_SERVER_NAME=0.0.0.0, pip
installs from requirements.txt (torch first, from the TORCH_INDEX build argument), the weight
prefetch, CMD starting app.py, and every COPY source present in the repository and not excluded
by .dockerignore. Plus the README's Spaces front matter.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """``[(INSTRUCTION, arguments)]`` with line continuations joined, runs of whitespace collapsed and
    comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    return out


def env_vars(instrs: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, args in instrs:
        if instr == "ENV":
            for tok in shlex.split(args):
                k, _, v = tok.partition("=")
                env[k] = v
    return env


@pytest.fixture(scope="module")
def instrs() -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_parser_joins_continuations():
    got = parse_dockerfile("# c\nFROM a\nENV A=1 \\\n    B=2\nRUN x && \\\n  y\n")
    assert got == [("FROM", "a"), ("ENV", "A=1 B=2"), ("RUN", "x && y")]


def test_base_and_build_args(instrs):
    assert instrs[0] == ("FROM", "python:3.12-slim")
    args = {a.split("=")[0]: a.partition("=")[2] for i, a in instrs if i == "ARG"}
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"  # CPU by default, overridable


def test_non_root_user_uid_1000(instrs):
    runs = " ".join(a for i, a in instrs if i == "RUN")
    m = re.search(r"useradd\b[^&]*-u\s+1000\s+(\w+)", runs)
    assert m, "a user with uid 1000 must be created"
    users = [a for i, a in instrs if i == "USER"]
    assert users and users[-1] in (m.group(1), "1000")
    # the last USER comes before CMD, and nothing runs as root after it
    idx_user = max(k for k, (i, _) in enumerate(instrs) if i == "USER")
    assert all(i != "RUN" for i, _ in instrs[idx_user:])


def test_port_env_and_healthcheck(instrs):
    assert ("EXPOSE", "7860") in instrs
    env = env_vars(instrs)
    assert env["GRADIO_SERVER_NAME"] == "0.0.0.0"
    assert env["GRADIO_SERVER_PORT"] == "7860"
    assert env["GRADIO_ANALYTICS_ENABLED"] == "False"
    assert env["TORCH_HOME"].startswith("/")
    health = [a for i, a in instrs if i == "HEALTHCHECK"]
    assert len(health) == 1
    assert "CMD" in health[0] and "python" in health[0] and "curl" not in health[0]
    assert "7860" in health[0]


def test_pip_installs_use_requirements(instrs):
    pips = [a for i, a in instrs if i == "RUN" and "pip install" in a]
    assert any("-r requirements.txt" in a for a in pips)
    torch_first = [k for k, a in enumerate(pips) if "torch==" in a and "$TORCH_INDEX" in a]
    req = [k for k, a in enumerate(pips) if "-r requirements.txt" in a]
    assert torch_first and torch_first[0] < req[0], "torch from TORCH_INDEX must be installed before the requirements"
    # the torch pins agree with requirements.txt
    reqs = (ROOT / "requirements.txt").read_text()
    args = {a.split("=")[0]: a.partition("=")[2] for i, a in instrs if i == "ARG"}
    assert f"torch=={args['TORCH_VERSION']}" in reqs
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in reqs


def test_weights_prefetch_and_cmd(instrs):
    runs = [a for i, a in instrs if i == "RUN"]
    assert any("python -m plugconv.prefetch" in a for a in runs)
    cmd = [a for i, a in instrs if i == "CMD"]
    assert len(cmd) == 1
    assert json.loads(cmd[0]) == ["python", "app.py"]


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for p in patterns:
        neg = p.startswith("!")
        pat = p[1:] if neg else p
        pat = pat.rstrip("/")
        hit = fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.replace("**/", "")) or \
            path.startswith(pat + "/")
        if hit:
            ignored = not neg
    return ignored


def test_every_copy_source_exists_and_is_not_ignored(instrs):
    patterns = _dockerignore()
    copies = [a for i, a in instrs if i == "COPY"]
    assert copies
    for args in copies:
        toks = [t for t in shlex.split(args) if not t.startswith("--")]
        assert len(toks) >= 2, args
        for src in toks[:-1]:
            path = src.rstrip("/")
            assert (ROOT / path).exists(), f"COPY source {src} does not exist"
            assert not _ignored(path, patterns), f"COPY source {src} is excluded by .dockerignore"
    # the app's runtime files are all copied
    copied = " ".join(copies)
    for needed in ("requirements.txt", "plugconv/", "viz/", "assets/", "app.py", "pyproject.toml"):  # version
        assert needed in copied, needed


def test_dockerignore_keeps_the_context_small():
    patterns = _dockerignore()
    for p in (".git", ".venv", "tests", ".gradio"):
        assert p in patterns, p


def test_readme_spaces_front_matter():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "the README must start with the Spaces YAML front matter"
    fm = text.split("---\n", 2)[1]
    keys = dict(line.split(":", 1) for line in fm.splitlines() if ":" in line)
    keys = {k.strip(): v.strip() for k, v in keys.items()}
    assert keys["sdk"] == "gradio"
    assert keys["sdk_version"] == '"6.31.0"'
    assert "gradio==6.31.0" in (ROOT / "requirements.txt").read_text()  # the two pins agree
    assert keys["app_file"] == "app.py"
    assert re.fullmatch(r'"3\.\d+(\.\d+)?"', keys["python_version"]), "python_version must be quoted"
    for k in ("title", "short_description", "suggested_hardware", "startup_duration_timeout"):
        assert keys.get(k), k
    assert len(keys["short_description"]) <= 60
    # the README still begins (after the front matter) with the two one-command instructions
    body = text.split("---\n", 2)[2]
    assert "bash scripts/run_app.sh" in body.split("## ")[0]
    assert "bash scripts/test.sh" in body.split("## ")[0]
    assert "## Deploy" in body and "docker build" in body and "docker run" in body


def test_docker_steps_script_is_valid_bash():
    script = ROOT / "scripts" / "docker_steps.sh"
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = script.read_text()
    # same prefetch and start commands as the Dockerfile
    assert "-m plugconv.prefetch" in text and "app.py" in text and "-r requirements.txt" in text


def test_prefetch_cli_lists_without_downloading(tmp_path):
    res = subprocess.run([sys.executable, "-m", "plugconv.prefetch", "--list"], cwd=ROOT, capture_output=True,
                         text=True, env={"TORCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "resnet50: not cached" in res.stdout and str(tmp_path) in res.stdout
    bad = subprocess.run([sys.executable, "-m", "plugconv.prefetch", "vgg16"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "vgg16" in bad.stderr
