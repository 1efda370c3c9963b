"""Where should a spatial transformer go? The STN placement experiment on rotated digits.

Run:  python examples/stn_placement.py [--task rotate|scale] [--seeds 3] [--epochs 30] [--out DIR] [--force]

Trains the classifier with no STN, with an STN on the input, on the feature
maps after block 1, 2 or 3, with a deeper separate localization net, and with
a localization head that shares the classifier's own layers; prints accuracy
(mean +- std over seeds) next to how well each trained model's maps of a
transformed digit match those of the upright digit, and saves CSVs and plots.
"""
import argparse

from alignscope.stn import run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="rotate", choices=["rotate", "scale"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default="stn-placement")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    experiment = run_experiment(args.task, seeds=args.seeds, epochs=args.epochs, progress=print)
    summary = experiment.summary()
    print()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    by_variant = summary.set_index("variant")["test_accuracy_mean"]
    features = by_variant[[v for v in by_variant.index if v.startswith("features@")]]
    shared = by_variant[[v for v in by_variant.index if v.startswith("shared@")]]
    print(f"\nbest features@k {features.max():.3f} vs input {by_variant['input']:.3f}; "
          f"best shared@k {shared.max():.3f} vs deep-input {by_variant['deep-input']:.3f} vs none {by_variant['none']:.3f}")
    print(f"written to {experiment.save(args.out, force=args.force)}/")


if __name__ == "__main__":
    main()
