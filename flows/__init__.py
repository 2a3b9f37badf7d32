"""The jobs: models, prep, train, distill, serve graph, demo and the CLI."""
