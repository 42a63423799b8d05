import importlib.util
import os

import torch
from hypothesis import HealthCheck, settings

# Kernel tests without a GPU run triton's interpreter (tests/kernel_support.py). triton decorates its own language
# functions (tl.sum, tl.zeros) when it is first imported, and an interpreted kernel can only call interpreted ones,
# so without CUDA triton is imported here, before anything else imports it, with the interpreter on; the variable is
# restored at once, so every other test keeps the torch paths (layersolve.kernels.use_triton reads it per call).
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    _before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before

# "ci": reproducible (derandomized) and free of wall-clock deadlines, which a loaded 2-core CI machine would trip.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
# "dev": more, random examples for local exploration (HYPOTHESIS_PROFILE=dev).
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
