import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatune.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Each family as we test it: Llama with llama3 rope scaling (short original context so the
# scaling changes the frequencies we use), Qwen2 with tied embeddings and q/k/v biases,
# Qwen3 with an explicit head_dim and q/k norms.
FAMILY_MODELS = {
    "llama": dict(
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=10000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        )
    ),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        family: make_tiny_model(family, str(root / family), seed=i, **kwargs)
        for i, (family, kwargs) in enumerate(FAMILY_MODELS.items())
    }


def run_megatune(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a fresh interpreter (as a user would)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-m", "megatune", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


@pytest.fixture(scope="session")
def megatune_env():
    """One `megatune env` run, shared by the tests that read its report."""
    return run_megatune("env", timeout=300)


@pytest.fixture
def megatune_in_process(capsys):
    """`megatune <args>` through the CLI's `main` in this process -> CompletedProcess. For
    commands that must fail in the launcher's own checks, before any worker could start: their
    exit code and output are those of a fresh interpreter (`python -m megatune` is
    `raise SystemExit(main())`), without its seconds of imports."""
    from megatune.cli import main

    def run(*args) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return subprocess.CompletedProcess(["megatune", *map(str, args)], code, out.out, out.err)

    return run
