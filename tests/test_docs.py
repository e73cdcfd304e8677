"""The documents stay true: their Python runs, their commands exist, their generated numbers match the files.

- Every ```python block of README.md and ``docs/*.md`` runs, the blocks of one
  document in order in one namespace, in a fresh offline process. Hub names
  resolve to small local models through a temporary hub cache (``roberta-base``:
  all-MiniLM-L6-v2; ``HuggingFaceTB/SmolLM2-135M-Instruct``: the copy the
  ``smollm2-135m`` model config builds). A block that cannot run here is
  preceded by ``<!-- docs-test: skip (reason) -->``.
- Every ``make <target>`` they show is a Makefile target, every ``python -m
  <module>`` answers ``--help``, every ``scripts/…`` file exists.
- Every ``<!-- include … -->`` block equals the file it includes.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import data_dir

from melora.experiments.report import include

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL_DOCUMENTS = include.documents(ROOT)
FENCE = re.compile(r"(?P<marker><!-- docs-test: skip \((?P<reason>[^)]*)\) -->\n)?```(?P<lang>\w*)\n(?P<code>.*?)```", re.S)
HUB_STAND_INS = {"roberta-base": "minilm", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m"}

RUNNER = """
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, (line, code) in enumerate(blocks):
    try:
        exec(compile(code, f"{sys.argv[2]}:{line}", "exec"), namespace)
    except BaseException:
        traceback.print_exc()
        print(f"FAILED: the block at {sys.argv[2]}:{line}", file=sys.stderr)
        sys.exit(1)
"""


def code_blocks(text: str, lang: str) -> list[tuple[int, str, str | None]]:
    """``(line, code, skip reason)`` of every fenced block of language ``lang``."""
    return [(text[: m.start("code")].count("\n") + 1, m.group("code"), m.group("reason"))
            for m in FENCE.finditer(text) if m.group("lang") == lang]


def code_text(text: str) -> str:
    """The code a document shows: fenced blocks and inline code spans."""
    fenced = "\n".join(m.group("code") for m in FENCE.finditer(text))
    inline = "\n".join(re.findall(r"`([^`\n]+)`", FENCE.sub("", text)))
    return fenced + "\n" + inline


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> Path:
    """A hub cache in which the documents' hub names resolve to the offline models."""
    from omegaconf import OmegaConf

    from melora.experiments.models import resolve_model_path

    cache = tmp_path_factory.mktemp("hub")
    for repo, config in HUB_STAND_INS.items():
        spec = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / f"{config}.yaml"))
        folder = Path(resolve_model_path(spec))
        repo_dir = cache / f"models--{repo.replace('/', '--')}"
        snapshot = repo_dir / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text("0" * 40)
        for path in folder.rglob("*"):
            if path.is_file():
                target = snapshot / path.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(path)
    return cache


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if code_blocks(d.read_text(), "python")],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_the_python_blocks_run(document, hub_cache, tmp_path):
    data_dir()
    blocks = [(line, code) for line, code, skip in code_blocks(document.read_text(), "python") if skip is None]
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = dict(os.environ, HF_HUB_CACHE=str(hub_cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"), str(document.relative_to(ROOT))],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def test_every_skipped_block_says_why():
    for document in DOCUMENTS:
        for line, _, skip in code_blocks(document.read_text(), "python"):
            assert skip is None or skip.strip(), f"{document}:{line}: a skipped block needs its reason"


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def shown(pattern: str) -> dict[str, list[str]]:
    """What ``pattern``'s first group matches in the code of each document → the documents that show it."""
    found: dict[str, list[str]] = {}
    for document in ALL_DOCUMENTS:
        for match in re.findall(pattern, code_text(document.read_text())):
            found.setdefault(match, []).append(str(document.relative_to(ROOT)))
    return found


def test_every_make_target_the_documents_show_exists():
    targets = makefile_targets()
    missing = {t: where for t, where in shown(r"\bmake ([a-z][\w-]*)").items() if t not in targets}
    assert not missing, f"not Makefile targets: {missing}"


def test_every_script_the_documents_show_exists():
    missing = {s: where for s, where in shown(r"\b(scripts/[\w./-]+\.py)").items() if not (ROOT / s).is_file()}
    assert not missing, missing


def test_every_python_module_the_documents_show_answers_help():
    modules = shown(r"python -m ((?:melora|scripts)[\w.]*)")
    assert "melora.experiments.glue" in modules and "melora.experiments.sweep" in modules
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for module, where in sorted(modules.items()):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"python -m {module} --help (shown in {where}):\n{(proc.stdout + proc.stderr)[-2000:]}"


@pytest.mark.parametrize("document", ALL_DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_included_numbers_match_the_generated_files(document):
    text = document.read_text()
    for source, section, body in include.blocks(text):
        expected = include.included_text(source, section, ROOT)
        assert body == expected, f"{document.relative_to(ROOT)}: the block of {source} is stale: run make docs"
