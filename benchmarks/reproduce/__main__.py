"""`python -m benchmarks.reproduce`: see run.py."""

from benchmarks.reproduce.run import main

if __name__ == "__main__":
    main()
