"""Draws docs/images/rope_frequencies.png: the rotation frequencies of every RoPE
scaling rule, read back from `RotaryPositionalEmbedding`'s own tables.

    python docs/scripts/rope_figure.py

The frequency of pair `i` is the angle its table advances by per position: with
`cos[p, i] = a * cos(p * f_i)` and `sin[p, i] = a * sin(p * f_i)` (`a` the attention
factor), `f_i = atan2(sin[1, i], cos[1, i])`, exact while `f_i < pi`, which holds for
every pair (`f_0 = 1` is the largest).
"""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eqx_embed  # noqa: E402

HEAD_DIM = 128
THETA = 500_000.0
ORIGINAL = 8192  # the pretraining context of the scaled rules
FACTOR = 4.0
LONGROPE_FACTORS = np.linspace(1.0, FACTOR, HEAD_DIM // 2).tolist()

RULES = {
    "default (no scaling)": None,
    "linear": {"rope_type": "linear", "factor": FACTOR},
    "dynamic (NTK)": {
        "rope_type": "dynamic",
        "factor": FACTOR,
        "original_max_position_embeddings": ORIGINAL,
    },
    "yarn": {
        "rope_type": "yarn",
        "factor": FACTOR,
        "original_max_position_embeddings": ORIGINAL,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": FACTOR,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
    },
    "longrope (long factors)": {
        "rope_type": "longrope",
        "factor": FACTOR,
        "short_factor": [1.0] * (HEAD_DIM // 2),
        "long_factor": LONGROPE_FACTORS,
        "original_max_position_embeddings": ORIGINAL,
    },
}


def frequencies_and_factor(scaling) -> tuple[np.ndarray, float]:
    rope = eqx_embed.RotaryPositionalEmbedding(
        HEAD_DIM,
        # Longer than the original context, so that dynamic and longrope scale.
        max_seq_len=int(FACTOR * ORIGINAL),
        theta=THETA,
        scaling=scaling,
    )
    cos, sin = np.asarray(rope.cos[1], np.float64), np.asarray(rope.sin[1], np.float64)
    return np.arctan2(sin, cos), rope.attention_factor


def main() -> None:
    figure, (wavelengths, ratios) = plt.subplots(1, 2, figsize=(12, 4.8))
    pairs = np.arange(HEAD_DIM // 2)
    default, _ = frequencies_and_factor(None)
    for (name, scaling), style in zip(
        RULES.items(), ["-", "--", "-.", ":", "-", "--"], strict=True
    ):
        frequencies, factor = frequencies_and_factor(scaling)
        label = name if factor == 1.0 else f"{name}, attention factor {factor:.3f}"
        wavelengths.plot(pairs, 2 * np.pi / frequencies, style, label=label)
        ratios.plot(pairs, frequencies / default, style, label=label)
    wavelengths.axhline(ORIGINAL, color="gray", linewidth=0.8)
    wavelengths.text(0, ORIGINAL * 1.3, "original context", color="gray")
    wavelengths.set_yscale("log")
    wavelengths.set_ylabel("wavelength 2π / frequency (positions)")
    ratios.set_ylabel("frequency / unscaled frequency")
    ratios.set_ylim(0, 1.05)
    for axes in (wavelengths, ratios):
        axes.set_xlabel("rotary pair i (of head_dim / 2 = 64)")
        axes.grid(alpha=0.3, which="both")
    wavelengths.legend(fontsize=8)
    figure.suptitle(
        f"RoPE scaling rules: head_dim {HEAD_DIM}, theta {THETA:,.0f}, "
        f"factor {FACTOR:g}, original context {ORIGINAL}"
    )
    figure.tight_layout()
    path = pathlib.Path(__file__).resolve().parent.parent / "images"
    path.mkdir(exist_ok=True)
    figure.savefig(path / "rope_frequencies.png", dpi=110)
    print(f"wrote {path / 'rope_frequencies.png'}")


if __name__ == "__main__":
    main()
