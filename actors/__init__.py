"""Stateful workers that hold a model, one class per role, usable from Ray Data, Ray Serve and plain Python."""
