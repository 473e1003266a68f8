"""Run under torchrun by tests/test_dist_faults.py: the train CLI itself, as a user starts it."""
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from sgengine.train import main

    sys.exit(main(sys.argv[1:]))
