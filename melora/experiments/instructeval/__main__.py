"""``python -m melora.experiments.instructeval [overrides]``: INSTRUCTEVAL of an adapter or a base model."""

from melora.experiments.instructeval.run import main

if __name__ == "__main__":
    main()
