"""The experiment side: the paper's pipelines, built on the library (``melora.adapters``) and never imported by it.

- ``glue``, ``instruct``, ``instructeval``: the entry points (``python -m melora.experiments.glue …``),
  on the run scaffold in ``scaffold`` (config → data → model → method → trainer → record);
- ``data``, ``metrics``, ``models``, ``paper_shapes``: datasets, metrics, model loading;
- ``train``: the Accelerate trainer, checkpoints, run locks, loggers;
- ``runs``, ``specs``, ``sweep``: run records, experiment specs, Hydra multiruns;
- ``report``: records → tables, figures and verdicts; ``cli``: one-line errors, Ctrl-C.

The Hydra configs and the specs live in the repository (``configs/``, ``experiments/``),
found beside the package or through ``MELORA_PROJECT_DIR``.
"""
