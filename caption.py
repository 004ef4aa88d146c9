"""Caption a folder of images: `python caption.py [IMAGES_DIR] [--config FILE] [KEY=VALUE ...]`.

The command line lives in `tagcaption/cli.py`; after `pip install .` the same is the
`caption` command.
"""
from tagcaption.cli import cli

if __name__ == "__main__":
    cli()
