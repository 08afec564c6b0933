"""Scoring a folder in which some files cannot be read (truncated, not an image, under the size
floor): infer.py and predict.py name each such file on one line of stderr, score the others, and
end with exit code SOME_UNREADABLE instead of stopping at the first bad file."""
import sys

from utils import UserError

SOME_UNREADABLE = 3  # 0: every image scored; 2: a usage error, nothing scored (utils.run_cli)


class UnreadableImages:
    """Loads images through a Preprocess; remembers the ones that could not be read."""

    def __init__(self):
        self.paths = []

    def load(self, preprocess, path):
        """-> preprocess.load(path), or None after naming the file on stderr."""
        try:
            return preprocess.load(path)
        except UserError as err:
            print(f"skipped: {err}", file=sys.stderr, flush=True)
            self.paths.append(path)
            return None

    def exit_code(self, total):
        """0, or SOME_UNREADABLE with a closing line saying how many of `total` were skipped."""
        if not self.paths:
            return 0
        print(f"error: {len(self.paths)} of {total} images could not be read (each named above); "
              f"the other {total - len(self.paths)} were scored", file=sys.stderr, flush=True)
        return SOME_UNREADABLE
