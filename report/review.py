"""review.json: the marks a reviewer sets on a report page (gallery.js writes the file), read
back by train.py --update --from_review.

    {"format": "paddle-anomaly-review/1",
     "report": "bottle",                       # the page's run name
     "model_version": "3f9c0a1b2d4e",          # null when the page shows several models
     "paths_relative_to": null,                # "data_path" on eval.py pages (paths relative to the data root)
     "created": "2026-12-03T16:55:38.140Z",    # when the page wrote the file
     "images": [{"path": "line/0412.png",      # as given on the command line (predict.py / infer.py)
                 "category": "bottle", "mark": "good", "score": 0.734512,
                 "model_version": "3f9c0a1b2d4e"}, ...]}

mark: "good" (the model flagged a normal part: a false alarm) or "defect" (it passed a defective
part: a miss); score: the calibrated score the page showed (0.5 = threshold).
"""
import json
import os

from utils import UserError

REVIEW_FORMAT = "paddle-anomaly-review/1"
MARKS = ("good", "defect")
PATHS_RELATIVE_TO = (None, "data_path")


def read_review(path):
    """The checked contents of a review.json; anything else is one UserError line."""
    try:
        with open(path, encoding="utf-8") as f:
            review = json.load(f)
    except FileNotFoundError:
        raise UserError(f"review file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not JSON ({err}); give the review.json a report page downloads") from None
    except OSError as err:
        raise UserError(f"cannot read review file {path}: {err.strerror or err}") from None
    if not isinstance(review, dict) or "format" not in review:
        raise UserError(f"{path} is not a review.json (no format field); give the file a report page downloads")
    if review["format"] != REVIEW_FORMAT:
        raise UserError(f"{path} is a review of format {review['format']!r}; this version reads {REVIEW_FORMAT}")
    if review.get("paths_relative_to") not in PATHS_RELATIVE_TO:
        raise UserError(f"{path}: paths_relative_to must be null or \"data_path\", "
                        f"not {review.get('paths_relative_to')!r}")
    images = review.get("images")
    if not isinstance(images, list) or not images:
        raise UserError(f"{path} names no images (mark some on the report page before downloading review.json)")
    for n, image in enumerate(images):
        problem = image_problem(image)
        if problem:
            raise UserError(f"{path}: image {n + 1} of {len(images)} {problem}")
    return review


def image_problem(image):
    if not isinstance(image, dict):
        return "is not an object"
    if not isinstance(image.get("path"), str) or not image["path"]:
        return "has no path"
    if image.get("mark") not in MARKS:
        return f"({image['path']}) has mark {image.get('mark')!r}, not one of {', '.join(MARKS)}"
    if not isinstance(image.get("category"), str) or not image["category"]:
        return f"({image['path']}) has no category"
    return None


def resolve_path(review, image, data_path):
    """Where a marked image is now: eval.py pages name images relative to the data root."""
    if review.get("paths_relative_to") == "data_path" and not os.path.isabs(image["path"]):
        return os.path.join(data_path, *image["path"].split("/"))
    return image["path"]
