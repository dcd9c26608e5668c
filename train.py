"""Trains a digit-sequence reader. Not built yet: training arrives with issue #3."""

import sys

if __name__ == "__main__":
    print(
        "train.py: training is not built yet (it arrives with the training issue); this build has the data "
        "pipeline: python -m pipeline.export --help, python -m pipeline.benchmark --help",
        file=sys.stderr,
    )
    sys.exit(1)
