"""Evaluates a trained digit-sequence reader. Not built yet: evaluation arrives with issue #4."""

import sys

if __name__ == "__main__":
    print(
        "eval.py: evaluation is not built yet (it arrives with the evaluation issue); this build has the data "
        "pipeline: python -m pipeline.export --help, python -m pipeline.benchmark --help",
        file=sys.stderr,
    )
    sys.exit(1)
