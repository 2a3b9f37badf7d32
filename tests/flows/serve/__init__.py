"""The serving tests that share one Serve app (conftest.py): a package, so that the app's
package-scoped fixture stops after its last test rather than at the end of the session."""
