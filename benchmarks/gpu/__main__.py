"""``python -m benchmarks.gpu [--smoke] [--out DIR] [--parts ...]``: see benchmarks/gpu/__init__.py."""

from ._kit import main

if __name__ == "__main__":
    main()
