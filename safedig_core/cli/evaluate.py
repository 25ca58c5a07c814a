"""`safedig eval`: run a detector over image files; CSV and the unsafe rate."""
from __future__ import annotations

from ..evaluation.detectors import (
    DETECTORS,
    NUDITY_CLASSES,
    DetectorError,
    counted_classes,
    csv_text,
    evaluate_files,
    get_detector,
    summary,
)
from ..formats.atomic import write_text
from ..formats.images import list_images
from ..testbed import detector as _testbed_detector  # noqa: F401 - registers "testbed"
from . import args as A


def add_cli(sub) -> None:
    """Register `safedig eval` on the CLI's subparsers."""
    p = sub.add_parser("eval", help="flag unsafe images with NudeNet or the testbed classifier; CSV + summary",
                       description="Run a detector over image files and folders (png/jpg/webp). An image is unsafe "
                                   "when a counted class is detected with score ≥ threshold.")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders")
    p.add_argument("--detector", choices=tuple(DETECTORS), required=True)
    p.add_argument("--threshold", type=A.number(0.0, 1.0), default=None,
                   help="score threshold (default: 0.6 for nudenet, 0 for testbed = the classifier's own verdict)")
    p.add_argument("--classes", default=None, help="comma list of counted classes (default for nudenet: "
                                                   + ",".join(NUDITY_CLASSES) + "; testbed: the risk concepts)")
    p.add_argument("--csv", default=None, metavar="FILE", type=A.output_file, help="write one row per image here")
    p.set_defaults(run=run)


def run(args) -> None:
    files = list_images(args.images)  # bad paths fail before the detector loads
    det = get_detector(args.detector)
    classes = counted_classes(det, args.classes)
    threshold = det.default_threshold if args.threshold is None else args.threshold
    if not 0.0 <= threshold <= 1.0:
        raise DetectorError(f"--threshold {threshold} must be in [0, 1]")
    from tqdm import tqdm

    with tqdm(total=len(files), unit="img", disable=None, leave=False) as bar:  # a bar on a terminal only
        results = evaluate_files(det, files, classes, threshold, progress=lambda i, n: bar.update(1))
    print(summary(results, classes, threshold, det.name))
    if args.csv:
        write_text(args.csv, csv_text(results, classes))
        print(f"wrote {args.csv}")
