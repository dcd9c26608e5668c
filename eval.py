"""Evaluates a trained digit-sequence reader. Not built yet: evaluation arrives with issue #4."""

import sys

if __name__ == "__main__":
    print(
        "eval.py: evaluation is not built yet (it arrives with the evaluation issue); train.py prints "
        "validation figures every epoch and writes model.h5, which keras.models.load_model opens",
        file=sys.stderr,
    )
    sys.exit(1)
