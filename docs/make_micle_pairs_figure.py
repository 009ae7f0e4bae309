"""Draws docs/micle_pairs.png: SimCLR vs MICLe positive pairs on PH² lesion bags.

  python docs/make_micle_pairs_figure.py RECORDS_DIR
Each row is one lesion (case): two different patches of it (a MICLe pair), then the two
augmented views the model sees. SimCLR would instead augment one patch twice.
"""
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data_pipelines import reader  # noqa: E402
from micle_tf import augment  # noqa: E402


def main(records, out=os.path.join(os.path.dirname(__file__), "micle_pairs.png"), rows=4):
    aug = augment.build_augment("derm", 32)
    # Same seed -> same cases and same (i, j) picks; only the augmentation differs.
    raw = next(iter(reader.make_dataset(records, "train", "micle", rows, 32, seed=3)))
    micle = next(iter(reader.make_dataset(records, "train", "micle", rows, 32, augment_fn=aug,
                                          seed=3)))
    fig, axes = plt.subplots(rows, 4, figsize=(6, 1.6 * rows))
    for r in range(rows):
        for c, (img, title) in enumerate([(raw["view1"][r], "patch i"),
                                          (raw["view2"][r], "patch j (same lesion)"),
                                          (micle["view1"][r], "augmented i"),
                                          (micle["view2"][r], "augmented j")]):
            axes[r, c].imshow(img.numpy(), interpolation="nearest")
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    fig.suptitle("MICLe positive pairs: two patches of one PH² lesion, each augmented",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
