"""Entry point: ``python train.py fit -c configs/demo.yaml`` (see README.md)."""

from m2ib_lightning.run.cli import main

if __name__ == "__main__":
    main()
