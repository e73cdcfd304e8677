"""``python -m melora.instructeval [overrides]``: INSTRUCTEVAL of an adapter or a base model."""

from melora.instructeval.run import main

if __name__ == "__main__":
    main()
