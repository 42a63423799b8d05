import os

from hypothesis import HealthCheck, settings

# "ci": reproducible (derandomized) and free of wall-clock deadlines, which a loaded 2-core CI machine would trip.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
# "dev": more, random examples for local exploration (HYPOTHESIS_PROFILE=dev).
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
