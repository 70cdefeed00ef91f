"""How tests/data/tf_gpt2_tiny was made: a tiny GPT-2-shaped checkpoint saved by TensorFlow itself.

Run with TensorFlow installed (it is not a dependency of gpt-tui):
    python make_with_tensorflow.py OUT_DIR
Variables have OpenAI's GPT-2 names and layouts; their values follow ``expected_value`` so a
test can recompute them without TensorFlow.
"""

import json
import sys

import numpy as np

HPARAMS = {"n_vocab": 96, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 1}


def shapes(hp: dict) -> dict[str, list[int]]:
    V, T, C = hp["n_vocab"], hp["n_ctx"], hp["n_embd"]
    out = {"model/wte": [V, C], "model/wpe": [T, C], "model/ln_f/g": [C], "model/ln_f/b": [C]}
    for i in range(hp["n_layer"]):
        p = f"model/h{i}/"
        out.update({
            p + "ln_1/g": [C], p + "ln_1/b": [C], p + "attn/c_attn/w": [1, C, 3 * C], p + "attn/c_attn/b": [3 * C],
            p + "attn/c_proj/w": [1, C, C], p + "attn/c_proj/b": [C], p + "ln_2/g": [C], p + "ln_2/b": [C],
            p + "mlp/c_fc/w": [1, C, 4 * C], p + "mlp/c_fc/b": [4 * C], p + "mlp/c_proj/w": [1, 4 * C, C],
            p + "mlp/c_proj/b": [C],
        })
    return out


def expected_value(k: int, shape: list[int]) -> np.ndarray:
    n = int(np.prod(shape))
    return (np.sin(np.arange(n) * 0.37 + k) * 0.3 + (1.0 if shape == [8] and k % 2 == 0 else 0.0)).astype(
        np.float32).reshape(shape)


def main(out: str) -> None:
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    for k, (name, shape) in enumerate(sorted(shapes(HPARAMS).items())):
        tf.compat.v1.get_variable(name, initializer=tf.constant(expected_value(k, shape)))
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as s:
        s.run(tf.compat.v1.global_variables_initializer())
        saver.save(s, f"{out}/model.ckpt", write_meta_graph=False)
    with open(f"{out}/hparams.json", "w") as f:
        json.dump(HPARAMS, f)


if __name__ == "__main__":
    main(sys.argv[1])
