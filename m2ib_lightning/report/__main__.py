"""``python -m m2ib_lightning.report``."""

from m2ib_lightning.report.cli import main

if __name__ == "__main__":
    main()
