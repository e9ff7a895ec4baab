"""Task tests (a package, so their module names cannot clash with tests/models/test_*.py)."""
