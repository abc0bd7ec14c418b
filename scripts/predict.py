#!/usr/bin/env python
"""Apply a trained classifier to new images: one CSV row per image with the predicted class and every class's
probability; with --labels, also the paper's metrics against the true classes.

    python scripts/predict.py --model runs/<finetune run>/model.pt --images /data/new-scans
    python scripts/predict.py --model runs/<run>/heated.pt --images a.png b.jpg --out heated.csv
    python scripts/predict.py --model runs/<finetune run>/model.pt --images /data/brain-mri/test --labels

--model is a fine-tuning run's model.pt or a pretraining run's heated.pt. Each image is read, converted to the
model's channels and resized to its image size exactly as in training and evaluation. An image that cannot be read
gets a row with the reason in its error column, and the run goes on. With --labels the images are folders laid out
as DIR/<class>/* (as a fine-tuning dataset's test/ folder), the class folders named after the model's classes.
"""

from __future__ import annotations

import argparse
import sys

from classifiers.cli import fail_cleanly
from classifiers.figures import expected_calibration_error
from classifiers.inference import (
    MODEL_FILES,
    check_output,
    find_images,
    labelled_images,
    load_model_file,
    predict_files,
    write_predictions,
)
from classifiers.metrics import METRIC_NAMES, classification_metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=MODEL_FILES)
    p.add_argument("--images", required=True, nargs="+", help="image files and folders (searched through); with "
                   "--labels, folders laid out as DIR/<class>/*")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write (default: predictions.csv)")
    p.add_argument("--labels", action="store_true", help="the images' folders name their true classes "
                   "(DIR/<class>/*): add a true_class column and print the paper's metrics")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = check_output(args.out)
    model_file = load_model_file(args.model)
    if args.labels:
        files, labels = labelled_images(args.images, model_file.class_names)
    else:
        files, labels = find_images(args.images), None
    predictions = predict_files(model_file, files, args.batch_size, args.device)
    write_predictions(out, predictions, model_file.class_names, labels)
    read = predictions.readable
    unread = len(files) - int(read.sum())
    print(f"{out}: predictions for {len(files)} images, read at {model_file.image_size} px in "
          f"{model_file.in_channels} channel(s)" + (f"; {unread} could not be read (see their error column)"
                                                    if unread else ""))
    if labels is not None:
        if not read.any():
            raise ValueError(f"none of the {len(files)} images could be read, so there are no metrics; see the error "
                             f"column of {out}")
        metrics = classification_metrics(labels[read], predictions.probs[read])
        print(f"{int(read.sum())} labelled images: " + ", ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_NAMES)
              + f", ece {expected_calibration_error(labels[read], predictions.probs[read]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(fail_cleanly(main))
