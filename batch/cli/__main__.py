"""``python -m batch.cli``: the same as ``unet-batch``."""

from batch.cli import main

if __name__ == "__main__":
    main()
