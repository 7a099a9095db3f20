"""Small model files written by real Keras 3 and tf.keras 2, with the outputs Keras
computed, for tests/test_keras_files.py (which needs neither).

    # Keras 3 (JAX backend):
    KERAS_BACKEND=jax /tmp/kvenv/bin/python tools/make_keras_model_fixtures.py keras3
    # tf.keras 2 (pip install tensorflow-cpu tf-keras h5py):
    /tmp/tfvenv/bin/python tools/make_keras_model_fixtures.py keras2

Each model is a Functional model holding a nested Sequential ("encoder") and
several Conv3D / Conv3DTranspose layers with non-default arguments. Written to
tests/fixtures/models/: the model as .keras (Keras 3), legacy .h5 and
weights-only files, and <flavour>_outputs.npz with, per layer name, a random
input and what that layer alone computes on it.
"""

import json
import os
import sys

FLAVOUR = sys.argv[1] if len(sys.argv) > 1 else "keras3"
if FLAVOUR == "keras2":
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tf_keras as keras  # noqa: E402
else:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras  # noqa: E402
import numpy as np  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "models")
L = keras.layers


def build():
    inp = keras.Input((10, 9, 8, 2))
    encoder = keras.Sequential([
        keras.Input((10, 9, 8, 2)),
        L.Conv3D(4, 3, padding="same", activation="relu", name="enc_a"),
        L.Conv3D(4, (3, 2, 3), strides=(1, 2, 1), activation="hard_sigmoid", name="enc_b"),
    ], name="encoder")
    h = encoder(inp)
    h = L.Conv3DTranspose(3, 3, strides=2, padding="same", activation="tanh", name="up")(h)
    h = L.Conv3D(2, 1, use_bias=False, name="head")(h)
    return keras.Model(inp, h, name="net")


def main():
    rng = np.random.default_rng(42 if FLAVOUR == "keras3" else 43)
    model = build()
    # Non-trivial weights (not the initializers' defaults).
    for layer in model.layers + model.get_layer("encoder").layers:
        if layer.get_weights():
            layer.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.4
                               for w in layer.get_weights()])
    os.makedirs(OUT, exist_ok=True)
    prefix = os.path.join(OUT, FLAVOUR)
    if FLAVOUR == "keras3":
        model.save(prefix + ".keras")
        model.save_weights(prefix + ".weights.h5")
    model.save(prefix + ".h5")
    if FLAVOUR == "keras2":
        model.save_weights(prefix + "_weights.h5")  # legacy weights-only HDF5
    outputs = {}
    layers = {"encoder/enc_a": model.get_layer("encoder").get_layer("enc_a"),
              "encoder/enc_b": model.get_layer("encoder").get_layer("enc_b"),
              "up": model.get_layer("up"), "head": model.get_layer("head")}
    for name, layer in layers.items():
        in_shape = tuple(layer.input.shape if FLAVOUR == "keras3" else layer.input_shape)
        x = rng.standard_normal((2,) + tuple(in_shape[1:])).astype("float32")
        outputs[name + "/x"] = x
        outputs[name + "/y"] = np.asarray(layer(x)).astype("float32")
    np.savez_compressed(prefix + "_outputs.npz", **outputs)
    with open(prefix + "_info.json", "w") as fh:
        json.dump({"keras_version": keras.__version__, "layers": list(layers)}, fh)
    print(FLAVOUR, keras.__version__, "wrote", prefix, file=sys.stderr)


if __name__ == "__main__":
    main()
