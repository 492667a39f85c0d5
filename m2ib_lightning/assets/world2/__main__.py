"""``python -m m2ib_lightning.assets.world2 data/world2 --n 200``."""

from m2ib_lightning.assets.world2 import main

if __name__ == "__main__":
    main()
