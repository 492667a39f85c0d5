"""``python -m m2ib_lightning.select -c CONFIG [...]``: choose M2IB's layers and variants without labels."""

from m2ib_lightning.select.cli import main

if __name__ == "__main__":
    main()
