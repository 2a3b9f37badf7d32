"""The shards most tests read: tiny bundles, the sample corpus (photographs, drawings, videos
and broken files) and `raygen prep` of it with every stage on (captioner, CLIP scorer, the
t2i bundle, and the i2v one for videos: their latents and text embeddings are t2v's, plus
each clip's first-frame conditioning), on a local Ray of its own.

`python -m tests.sample_prep DATA_DIR`: run by the session fixture ``sample_process``
(tests/conftest.py) in the background, as a user runs the CLI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows.models import build_tiny_bundles
from flows.prep import run_prep
from flows.samples import build_sample_corpus
from schemas.config import PrepConfig, load_config


def main(data: Path) -> None:
    bundles = build_tiny_bundles(data / "bundles")
    counts = build_sample_corpus(data / "corpus")
    print("sample corpus: " + ", ".join(f"{count} {kind}" for kind, count in counts.items()))
    config = load_config(
        PrepConfig,
        values={
            "input": str(data / "corpus"),
            "output": str(data / "shards"),
            "bundle.uri": str(bundles["t2i"]),
            "video_bundle.uri": str(bundles["i2v"]),
            "caption.model.uri": str(bundles["captioner"]),
            "filters.scorer.uri": str(bundles["scorer"]),
        },
    )
    run_prep(config)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
