"""Where things run and live: Ray start/connect, job submission, storage, manifests."""
