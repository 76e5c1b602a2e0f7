import os

# keras is a test oracle: it must run on JAX, set before it is imported.
os.environ.setdefault("KERAS_BACKEND", "jax")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "eqx_embed", max_examples=25, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("eqx_embed")
