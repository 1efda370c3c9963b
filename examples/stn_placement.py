"""Where should a spatial transformer go? The STN placement experiment on rotated digits.

Run:  python examples/stn_placement.py [--data digits|mnist:DIR] [--seeds 3] [--recipe digits|paper]
                                       [--iterations N] [--out DIR] [--force]

Trains the narrow classifier with no STN, with an STN on the input, on the
feature maps after layer 1 and 2, sharing the classifier's layers 1-2, and
with a deep separate localization net (a copy of layers 1-2); prints test
accuracy, how much rotation each learned warp undoes (angle_std_deg: 0 =
one canonical pose per class, about 52 = none; Deming slope: -1 = full
compensation) and saves CSVs and plots. Each row is mean +- std over seeds.
The ``digits`` recipe is the default of ``alignscope stn``; ``paper`` is the
papers' SGD recipe.
"""
import argparse

from alignscope.stn import RECIPES, recipe, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recipe", default="digits", choices=list(RECIPES))
    parser.add_argument("--iterations", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--out", default="stn-placement")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    experiment = run_experiment(args.data, seeds=args.seeds, config=recipe(args.recipe, iterations=args.iterations), log=print)
    summary = experiment.summary()
    print()
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.3f}"))

    s = summary.set_index("variant")
    for variant in s.index:
        print(f"{variant:>11}: accuracy {s.loc[variant, 'test_accuracy_mean']:.3f}, angle std "
              f"{s.loc[variant, 'angle_std_deg_mean']:.1f} +- {s.loc[variant, 'angle_std_deg_std']:.1f} deg, "
              f"slope {s.loc[variant, 'deming_slope_mean']:.2f}")
    print(f"written to {experiment.save(args.out, force=args.force)}/")


if __name__ == "__main__":
    main()
