"""Audit one model: which layers can an STN-style warp align for rotations, and which not?

Run:  python examples/audit_rotation.py [--images DIR] [--out DIR]

Uses the offline default (EfficientNet-Lite0 with ImageNet weights, bundled
photos), a rotation sweep and a translation control, prints the verdicts and
saves the report with its plots.
"""
import argparse

import alignscope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=None, help="folder/glob of images (default: bundled photos)")
    parser.add_argument("--out", default="rotation-audit")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    report = alignscope.analyze(
        "tf_efficientnet_lite0",
        transforms=["rotate:0:90:15", "translate32,0"],
        images=args.images,
        batch_size=8,
    )
    table = report.table
    rotations = table[table["sweep"] != ""]
    # per layer: the smallest angle at which the inverse warp leaves more than half of chance
    for layer, rows in rotations.groupby("layer", sort=False):
        failing = rows[rows["aligned_error"] > 0.5]
        first = f"{failing['magnitude'].min():g} deg" if len(failing) else "never (up to 90 deg)"
        print(f"{layer:10s} above half of chance from: {first}")
    print()
    print("\n".join(report.verdicts()))
    report.save(args.out, force=args.force)
    print(f"report written to {args.out}/")


if __name__ == "__main__":
    main()
