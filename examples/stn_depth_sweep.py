"""Does sharing the classifier's layers keep a deeper localization net stable? The depth sweep.

Run:  python examples/stn_depth_sweep.py --data mnist:DIR [--seeds 3] [--iterations 10000] [--jobs 2]
                                         [--out DIR] [--force]

Trains the narrow classifier without an STN, with an input STN, and with a
localization net that reads the classifier's features after k = 1..4 layers,
either through the classifier's own layers (shared@k) or through a separate
copy of them (deep@k); prints per variant the accuracy, how much rotation the
warp leaves (angle_std_deg), the share of seeds that diverged or collapsed,
and the one-line answer; saves the CSVs, the depth figure and the learning
curves. On 2 cores with --jobs 2, 10000 steps take about 40 minutes
(docs/stn-experiments.md has the measured time).
"""
import argparse

from alignscope.stn import recipe, run_experiment
from alignscope.stn.models import expand_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits", help="digits, or mnist:DIR with the four MNIST IDX files")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="stn-depth-sweep")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    variants = expand_variants("none,input,shared@1..4,deep@1..4", "narrow")
    experiment = run_experiment(args.data, variants=variants, seeds=args.seeds,
                                config=recipe("digits", iterations=args.iterations), jobs=args.jobs, log=print)
    s = experiment.summary().set_index("variant")
    for variant in s.index:
        print(f"{variant:>9}: accuracy {s.loc[variant, 'test_accuracy_mean']:.3f}, angle std "
              f"{s.loc[variant, 'angle_std_deg_mean']:.1f} deg (worst seed {s.loc[variant, 'angle_std_deg_worst']:.1f}), "
              f"diverged {s.loc[variant, 'diverged_fraction']:.0%}, collapsed {s.loc[variant, 'collapsed_fraction']:.0%}")
    print(experiment.depth_answer())
    print(f"written to {experiment.save(args.out, force=args.force)}/")


if __name__ == "__main__":  # the runs train in worker processes, which import this file
    main()
