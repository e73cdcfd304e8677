"""Every input error we can foresee ends in one line that names the fix, with exit status 1.

The entry points' ``main`` (``melora.experiments.glue``, ``melora.experiments.instruct``,
``melora.experiments.instructeval``, ``melora.experiments.sweep``) run in a child process forked from
this one, with the command line in ``sys.argv``: the code path of ``python -m
melora.<entry>`` without paying the interpreter's start-up per case (a few run
through ``python -m`` itself). Settings are checked before any model loads
(``melora.experiments.scaffold.validate_config``), unknown config options list the ones
there are, and files that are missing or damaged are named. The library calls
raise one-line errors that name the file.
"""

import importlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import data_dir, tiny_bert

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
GLUE = ["profile=smoke", "task=glue/rte", "logger=none"]
INSTRUCT = ["profile=smoke", "logger=none"]
EVAL = ["profile=smoke"]
SWEEP = ["demo", "--profile", "smoke"]


def run_main(module: str, args: list[str], out: Path, env: dict | None = None, prepare=None) -> tuple[int, str]:
    """``python -m <module> <args>`` as a forked child of this process: ``(exit status, stdout + stderr)``.

    ``prepare``: called in the child before the module runs (e.g. to patch a writer).
    """
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            # pytest's capture replaced the Python streams: point them at the file too.
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.chdir(ROOT)
            os.environ.clear()
            os.environ.update(env or ENV)
            if prepare is not None:
                prepare()
            entry = importlib.import_module(module)
            if hasattr(entry, "__path__"):  # a package: python -m runs its __main__
                entry = importlib.import_module(f"{module}.__main__")
            sys.argv = [entry.__file__, *args]
            result = entry.main()
            code = result if isinstance(result, int) else 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.read_text()


def assert_one_error_line(status: int, output: str, fragment: str) -> str:
    """The command failed with status 1 and one ``Error:`` line containing ``fragment``, and no traceback; returns the line."""
    lines = [line for line in output.splitlines() if line.startswith("Error: ")]
    assert status == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert len(lines) == 1, output[-3000:]
    assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def places(tmp_path) -> dict[str, Path]:
    """Folders the cases name: an empty one, a model folder without config.json, a damaged adapter."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_config = tmp_path / "model"
    no_config.mkdir()
    (no_config / "weights.bin").write_bytes(b"\0")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"format": "melora-adapter", "method": "lora", "config": {}}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x01\x00")  # "header too small"
    return {"empty": empty, "no_config": no_config, "adapter": adapter, "runs": tmp_path / "runs"}


# (entry, arguments, what the one line must contain: the setting and the fix). {empty}, {no_config}, {adapter}: see places.
CASES = [
    # The examples.
    ("melora.experiments.glue", [*GLUE, "trainer.mixed_precision=fp8"], "trainer.mixed_precision=fp8 is not supported on this machine; choose one of auto, no"),
    ("melora.experiments.glue", [*GLUE, "task.lr=-1"], "task.lr=-1 is invalid: it must be a number, above 0 (e.g. task.lr=4e-4)"),
    ("melora.experiments.glue", [*GLUE, "model.source=path", "model.name_or_path=/nonexistent"],
     "model.name_or_path=/nonexistent is not a folder: with model.source=path give a folder written by save_pretrained"),
    ("melora.experiments.glue", [*GLUE, "task=glue/foo"], "task=glue/foo is unknown; choose one of glue/cola, glue/mnli, glue/mrpc"),
    ("melora.experiments.glue", [*GLUE, "task.epochs=0"], "task.epochs=0 is invalid: it must be a whole number, at least 1 (e.g. task.epochs=3)"),
    ("melora.experiments.glue", [*GLUE, "method.r=0"], "r must be an integer >= 1, got 0"),
    ("melora.experiments.glue", [*GLUE, "method.scaling=bogus"], "scaling='bogus' is unknown"),
    ("melora.experiments.glue", [*GLUE, "method=melora", "method.n=7"], "is not divisible by n=7; choose n among"),
    ("melora.experiments.glue", [*GLUE[:1], "task=glue/mnli", *GLUE[2:]], "MNLI/train.tsv"),
    # Settings checked before any model loads.
    ("melora.experiments.glue", [*GLUE, "task.lr=0"], "task.lr=0 is invalid: it must be a number, above 0"),
    ("melora.experiments.glue", [*GLUE, "task.batch_size=0"], "task.batch_size=0 is invalid: it must be a whole number, at least 1"),
    ("melora.experiments.glue", [*GLUE, "trainer.per_device_batch_size=3"], "is not a multiple of the micro-batch trainer.per_device_batch_size=3; change one"),
    ("melora.experiments.glue", [*GLUE, "trainer.max_steps=0"], "trainer.max_steps=0 is invalid: it must be null or a whole number, at least 1"),
    ("melora.experiments.glue", [*GLUE, "trainer.warmup_ratio=2"], "trainer.warmup_ratio=2 is invalid: it must be a number, between 0 and 1"),
    ("melora.experiments.glue", [*GLUE, "model.source=path", "model.name_or_path={no_config}"], "holds no config.json: give a folder written by save_pretrained"),
    ("melora.experiments.glue", [*GLUE, "model.source=ftp"], "model.source=ftp is unknown; choose one of hub, path, package"),
    ("melora.experiments.glue", [*GLUE, "model=foo"], "model=foo is unknown; choose one of llama2-7b, minilm"),
    ("melora.experiments.glue", [*GLUE, "method=foo"], "method=foo is unknown; choose one of adalora, delta_lora, dylora, lora, melora"),
    ("melora.experiments.glue", [*GLUE, "selection=foo"], "selection=foo is unknown; choose one of dev, dev_halves, heldout"),
    ("melora.experiments.glue", [*GLUE, "data_dir={empty}"], "{empty}/glue/RTE/train.tsv. Local loading expects"),
    ("melora.experiments.instruct", [*INSTRUCT, "trainer.mixed_precision=fp8"], "trainer.mixed_precision=fp8 is not supported on this machine"),
    ("melora.experiments.instruct", [*INSTRUCT, "task.lr=0"], "task.lr=0 is invalid"),
    ("melora.experiments.instruct", [*INSTRUCT, "task.micro_batch_size=0"], "task.micro_batch_size=0 is invalid: it must be a whole number, at least 1"),
    ("melora.experiments.instruct", [*INSTRUCT, "model.dtype=float8"], "model.dtype=float8 is unknown; choose one of float32"),
    ("melora.experiments.instruct", [*INSTRUCT, "task=instruct/foo"], "task=instruct/foo is unknown; choose one of instruct/alpaca"),
    ("melora.experiments.instructeval", [*EVAL, "adapter_dir=/nonexistent"], "no adapter in /nonexistent"),
    ("melora.experiments.instructeval", [*EVAL, "adapter_dir={adapter}"],
     "{adapter}/adapter_model.safetensors is damaged (SafetensorError: Error while deserializing header: header too small); "
     "the adapter cannot be evaluated: train it again or restore the file"),
    ("melora.experiments.instructeval", [*EVAL, "eval.tasks=[mmlu,foo]"], "eval.tasks names unknown benchmark(s) foo; choose from mmlu"),
    ("melora.experiments.instructeval", [*EVAL, "eval.batch_size=0"], "eval.batch_size=0 is invalid: it must be a whole number, at least 1"),
    ("melora.experiments.instructeval", [*EVAL, "model=foo"], "model=foo is unknown; choose one of"),
    ("melora.experiments.sweep", ["nosuch", "--profile", "smoke"], "no experiment spec"),
    ("melora.experiments.sweep", ["demo", "--profile", "bogus"], "spec 'demo' has no profile 'bogus'; it has ['mini', 'smoke']"),
    ("melora.experiments.sweep", [*SWEEP, "--jobs", "0"], "--jobs 0 is invalid: give the number of local worker processes, at least 1"),
    ("melora.experiments.sweep", [*SWEEP, "--launcher", "bogus"], "hydra/launcher=bogus is unknown; choose one of"),
    ("melora.experiments.sweep", [*SWEEP, "trainer.mixed_precision=fp8"], "trainer.mixed_precision=fp8 is not supported on this machine"),
    ("melora.experiments.sweep", [*SWEEP, "task.lr=-1"], "task.lr=-1 is invalid"),
    ("melora.experiments.sweep", [*SWEEP, "task=glue/foo"], "task=glue/foo is unknown; choose one of glue/cola"),
]
if torch.cuda.is_available():  # a GPU machine has the device this case asks for
    CASES = [c for c in CASES if "fp8" not in " ".join(c[1])]
else:
    CASES.append(("melora.experiments.instructeval", [*EVAL, "eval.device=cuda"], "eval.device=cuda: this machine has no CUDA device; use eval.device=auto"))


def fill(text: str, places: dict[str, Path]) -> str:
    return text.format(**places)


def case_id(entry: str, args: list[str]) -> str:
    common = set(GLUE + INSTRUCT + EVAL + SWEEP)
    return f"{entry.split('.')[-1]}:{' '.join(a for a in args if a not in common)}"


@pytest.mark.parametrize("entry,args,fragment", CASES, ids=[case_id(e, a) for e, a, _ in CASES])
def test_a_bad_input_is_one_line_that_names_the_fix(entry, args, fragment, places, tmp_path):
    data_dir()
    args = [fill(a, places) for a in args]
    args += [f"runs_root={places['runs']}"]  # nothing is written under the checkout's runs/
    status, output = run_main(entry, args, tmp_path / "out.txt")
    assert_one_error_line(status, output, fill(fragment, places))
    assert not any(p.name == "record.json" for p in places["runs"].rglob("*")), "a run started"


@pytest.mark.parametrize("entry,args,fragment", [
    ("melora.experiments.glue", [*GLUE, "trainer.mixed_precision=fp8"], "trainer.mixed_precision=fp8 is not supported on this machine"),
    ("melora.experiments.sweep", [*SWEEP, "--jobs", "0"], "--jobs 0 is invalid"),
], ids=["glue", "sweep"])
def test_the_command_line_itself_gives_the_one_line(entry, args, fragment, tmp_path):
    """``python -m``: the ``__main__`` path prints the same line."""
    data_dir()
    proc = subprocess.run([sys.executable, "-m", entry, *args, f"runs_root={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert_one_error_line(proc.returncode, proc.stdout + proc.stderr, fragment)


def test_hydra_full_error_and_debug_give_the_traceback(tmp_path):
    data_dir()
    status, output = run_main("melora.experiments.glue", [*GLUE, "task.lr=-1", f"runs_root={tmp_path}"], tmp_path / "a.txt", dict(ENV, HYDRA_FULL_ERROR="1"))
    assert status == 1 and "Traceback" in output and "task.lr=-1 is invalid" in output
    status, output = run_main("melora.experiments.glue", [*GLUE, "task=glue/foo", f"runs_root={tmp_path}"], tmp_path / "b.txt", dict(ENV, HYDRA_FULL_ERROR="1"))
    assert status == 1 and "Could not find 'task/glue/foo'" in output  # Hydra's own report
    status, output = run_main("melora.experiments.sweep", [*SWEEP, "--jobs", "0", "--debug", f"runs_root={tmp_path}"], tmp_path / "c.txt")
    assert status == 1 and "Traceback" in output and "--jobs 0 is invalid" in output


# ---- library calls: a damaged or missing file is named in one line ----------------------------------


@pytest.fixture
def saved_adapter(tmp_path) -> Path:
    import melora

    model = melora.inject(tiny_bert(), melora.MELoRAConfig(r=2, n=2, target_modules=["query", "value"]))
    return melora.save_adapter(model, tmp_path / "adapter")


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_load_adapter_names_a_damaged_weights_file(saved_adapter):
    import melora

    weights = saved_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4])
    with pytest.raises(ValueError) as err:
        melora.load_adapter(tiny_bert(), saved_adapter)
    message = one_line(err.value)
    assert message.startswith(f"{weights} is damaged (") and "header too small" in message and "save or train it again" in message


def test_load_adapter_names_a_damaged_config_and_a_missing_weights_file(saved_adapter):
    import melora

    weights = saved_adapter / "adapter_model.safetensors"
    weights.unlink()
    with pytest.raises(FileNotFoundError) as err:
        melora.load_adapter(tiny_bert(), saved_adapter)
    assert one_line(err.value).startswith(f"{weights} not found") and "save or train it again" in str(err.value)
    config = saved_adapter / "adapter_config.json"
    config.write_text(config.read_text()[:20])
    with pytest.raises(ValueError) as err:
        melora.load_adapter(tiny_bert(), saved_adapter)
    assert one_line(err.value).startswith(f"{config} is damaged (") and "save or train it again" in str(err.value)


def test_load_glue_names_the_missing_file(tmp_path):
    from melora.experiments.data.glue import load_glue

    with pytest.raises(FileNotFoundError) as err:
        load_glue("rte", data_dir=tmp_path)
    assert str(tmp_path / "glue" / "RTE" / "train.tsv") in one_line(err.value) and "Put the file there" in str(err.value)


@pytest.mark.parametrize("entry,args", [("melora.experiments.glue", GLUE), ("melora.experiments.sweep", SWEEP)], ids=["glue", "sweep"])
def test_without_the_configs_the_pipelines_say_what_they_need(entry, args, tmp_path):
    """An installed package without its clone (a non-editable install): one line naming MELORA_PROJECT_DIR."""
    env = dict(ENV, MELORA_PROJECT_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", entry, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    line = assert_one_error_line(proc.returncode, proc.stdout + proc.stderr, f"no configs/ and experiments/ in {tmp_path}")
    assert "MELORA_PROJECT_DIR=<clone>" in line
