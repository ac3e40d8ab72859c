from tests.e2e.conftest import pipeline_factory  # noqa: F401  (the same harness)
