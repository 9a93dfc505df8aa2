"""`python -m fedllm.cli ...`, as the `fedllm` console script."""

import sys

from fedllm.cli import main

if __name__ == "__main__":  # importing this module (as the architecture test does) runs nothing
    sys.exit(main())
