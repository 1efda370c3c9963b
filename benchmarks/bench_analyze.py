"""Benchmark alignscope's analysis against bare forward passes; same options as ``alignscope bench``.

Run:  python benchmarks/bench_analyze.py --model resnet50 --no-pretrained --max-images 64 --json
"""
import sys

from alignscope.cli.main import main

if __name__ == "__main__":
    sys.argv = ["alignscope", "bench", *sys.argv[1:]]
    main()
