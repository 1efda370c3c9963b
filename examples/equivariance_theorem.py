"""The theorem on an equivariant network: rotations move information between channels.

Run:  pip install e2cnn && python examples/equivariance_theorem.py [--out DIR] [--force]

Three networks with random weights on the bundled photos (64 x 64), rot90:
a C8-equivariant e2cnn network before group pooling (regular fields), after
group pooling (invariant fields), and a plain CNN with the same channel
counts. For each: aligned_error after g^-1 and permuted_error after the best
channel permutation (fitted on 4 photos, measured on the other 4). Prints
the table and saves it with a bar plot.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

import alignscope  # noqa: E402
from alignscope.model.reference_nets import C8Network, PlainNetwork  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="equivariance-theorem")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise SystemExit(f"{out} is not empty; pass --force or choose another --out")

    rows = []
    for name, net in (("C8 e2cnn", C8Network()), ("plain CNN", PlainNetwork())):
        report = alignscope.analyze(net, transforms=["rot90"], layers=["regular", "pooled"], input_size=(3, 64, 64),
                                    batch_size=4, channel_map="permutation")
        for _, row in report.table.iterrows():
            rows.append({"network": name, "output": row["layer"], "channels": row["channels"],
                         "unaligned_error": row["unaligned_error"], "aligned_error": row["aligned_error"],
                         "permuted_error": row["permuted_error"], "channels_permuted": row["permuted_channels"],
                         "held_out_images": row["n_images"]})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2e}" if abs(v) < 1e-3 else f"{v:.3f}"))

    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "theorem.csv", index=False)
    fig, ax = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    labels = [f"{r.network}\n{r.output}" for r in table.itertuples()]
    xs = range(len(table))
    width = 0.27
    for offset, (column, label) in enumerate((("unaligned_error", "unaligned"), ("aligned_error", "after g$^{-1}$"),
                                              ("permuted_error", "after g$^{-1}$ + best channel permutation"))):
        ax.bar([x + (offset - 1) * width for x in xs], table[column], width, label=label)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.axhline(1.0, color="0.3", lw=1, ls="--")
    ax.set_ylabel("distance / chance distance")
    ax.set_title("rot90 on random-weight networks (bundled photos, 64 px)")
    ax.legend(fontsize=8)
    fig.savefig(out / "theorem.png", dpi=130)
    print(f"\nwritten to {out}/ (theorem.csv, theorem.png)")


if __name__ == "__main__":
    main()
