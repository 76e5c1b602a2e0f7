"""`GenerationConfig`: a model's defaults for `TransformerLM.generate`."""

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """A model's defaults for
    [`TransformerLM.generate`][eqx_embed.TransformerLM.generate], as a checkpoint's
    `generation_config.json` holds them: each argument of `generate` left `None` takes
    the value here, and each field left `None` here takes `generate`'s own default.
    Held by the model as static metadata (not a leaf).

    **Fields** (transformers' keys of the same names, apart from `temperature`):

    - `max_new_tokens`: how many tokens to generate.
    - `temperature`: `0` for greedy decoding, or the temperature of sampling
        (transformers' `do_sample` with its `temperature`).
    - `top_k`, `top_p`: the sampling filters; they apply only when sampling.
    - `repetition_penalty`: CTRL's penalty (`1` for none).
    - `eos_token_id`: the ids that end a row (one id or several).
    - `pad_token_id`: what fills a row after its end.

    **Raises:**

    Nothing when built: the values are checked against the model when `generate`
    uses them, a `ValueError` naming the argument (and when a checkpoint's file is
    read, a warning naming the key, which is then left unset).

    **Example:**

    ```python
    import jax
    import numpy as np

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, max_position_embeddings=32,
    )
    model = eqx_embed.TransformerLM(
        config,
        key=jax.random.key(0),
        generation_config=eqx_embed.GenerationConfig(
            max_new_tokens=5, repetition_penalty=1.2, eos_token_id=[0, 1]
        ),
    )
    prompts = np.array([[5, 9, 2]])
    assert model.generate(prompts).shape == (1, 5)  # the defaults
    assert model.generate(prompts, max_new_tokens=3).shape == (1, 3)  # overridden
    ```
    """

    max_new_tokens: int | None = None
    temperature: float | int | None = None
    top_k: int | None = None
    top_p: float | int | None = None
    repetition_penalty: float | int | None = None
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # A list of EOS ids becomes a tuple, so that the config stays hashable (it is
        # static metadata of the model).
        if isinstance(self.eos_token_id, Sequence) and not isinstance(
            self.eos_token_id, str
        ):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
