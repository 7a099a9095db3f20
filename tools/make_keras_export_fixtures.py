"""What real Keras 3 writes for a one-layer model, for tests/test_keras_export_structure.py.

`conv3d export` writes the ``.keras`` archive itself (Keras is not a
dependency); the test compares that archive with these, written by Keras:

    KERAS_BACKEND=jax /work/kerasenv/bin/python tools/make_keras_export_fixtures.py

Each model is ``Sequential([Input((None, None, None, C)), layer])`` (what the
exporter writes) saved with ``model.save``, with random weights, to
tests/fixtures/keras_export/<name>.keras. The layers use non-default
arguments so that every part of the layer config is exercised.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                   "keras_export")
L = keras.layers

MODELS = {
    # name: (input shape without batch, layer)
    "conv3d": ((None, None, None, 4), lambda: L.Conv3D(
        6, (3, 2, 3), strides=(1, 2, 1), padding="same", groups=2, activation="gelu",
        kernel_regularizer="l2")),
    "conv3d_transpose": ((2, None, None, None), lambda: L.Conv3DTranspose(
        3, 3, strides=2, padding="same", output_padding=1, data_format="channels_first",
        activation="softmax", use_bias=False)),
}


def main():
    rng = np.random.default_rng(7)
    os.makedirs(OUT, exist_ok=True)
    for name, (shape, make) in MODELS.items():
        keras.backend.clear_session()  # default names: sequential, input_layer, conv3d
        model = keras.Sequential([keras.Input(shape=shape), make()])
        layer = model.layers[-1]
        layer.set_weights([rng.standard_normal(w.shape).astype("float32")
                           for w in layer.get_weights()])
        model.save(os.path.join(OUT, name + ".keras"))
    print("keras", keras.__version__, "wrote", OUT)


if __name__ == "__main__":
    main()
