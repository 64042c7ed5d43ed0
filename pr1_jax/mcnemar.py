"""`python -m pr1_jax.mcnemar A.jsonl B.jsonl [--field correct]`: the command's name, kept; the
test lives in `pr1_jax.evaluation.mcnemar`, the evaluation room it reads result files through."""

import sys

from pr1_jax.evaluation.mcnemar import main

if __name__ == "__main__":
    sys.exit(main())
