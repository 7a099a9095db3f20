"""Make the small synthetic volumes and weights in sample_data/ (deterministic).

    python sample_data/make_sample_data.py

- brain.nii.gz   int16 "scan" 48x56x40, oblique affine (1.2 x 1.0 x 1.5 mm voxels)
- cells.h5       /stacks/cells: a 2-channel 32^3 float32 microscopy-like stack
- grid.npy       a 24^3 float32 simulation grid
- sobel3.npz     Conv3D weights: 3 Sobel filters (d/dx, d/dy, d/dz), kernel (3,3,3,1,3) + bias
- smooth.json    a Keras 3 layer config (Conv3D, 5x5x5, same, relu)
"""

import json
import os

import h5py
import nibabel as nib
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(20261122)


def brain():
    shape = (48, 56, 40)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = ((z / 0.9) ** 2 + (y / 0.85) ** 2 + (x / 0.8) ** 2) < 1
    brain_ = ((z / 0.75) ** 2 + (y / 0.7) ** 2 + (x / 0.65) ** 2) < 1
    ventricles = ((z / 0.15) ** 2 + (y / 0.3) ** 2 + ((np.abs(x) - 0.15) / 0.1) ** 2) < 1
    img = 300 * head + 500 * brain_ - 600 * ventricles + rng.normal(0, 20, shape)
    img = np.clip(img, 0, None).astype(np.int16)
    theta = np.deg2rad(12)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                    [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([1.2, 1.0, 1.5])
    affine[:3, 3] = [-28.0, -30.0, -25.0]
    nii = nib.Nifti1Image(img, affine)
    nii.header.set_xyzt_units("mm", "sec")
    nii.header.set_qform(affine, code=1)
    nii.header.set_sform(affine, code=2)
    nib.save(nii, os.path.join(HERE, "brain.nii.gz"))


def cells():
    shape = (32, 32, 32)
    vol = np.zeros(shape + (2,), np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for _ in range(12):
        c = rng.uniform(4, 28, 3)
        r = rng.uniform(2, 5)
        d2 = ((grid - c) ** 2).sum(-1)
        vol[..., 0] += np.exp(-d2 / (2 * r * r))
        vol[..., 1] += (d2 < (r / 2) ** 2) * rng.uniform(0.5, 1)
    vol += rng.normal(0, 0.02, vol.shape).astype(np.float32)
    with h5py.File(os.path.join(HERE, "cells.h5"), "w") as f:
        f.create_dataset("stacks/cells", data=vol.astype(np.float32), compression="gzip",
                         shuffle=True, chunks=(16, 16, 16, 2))


def grid():
    n = 24
    x = np.linspace(0, 2 * np.pi, n)
    g = np.sin(x)[:, None, None] * np.cos(2 * x)[None, :, None] + 0.5 * np.sin(3 * x)[None, None, :]
    np.save(os.path.join(HERE, "grid.npy"), g.astype(np.float32))


def sobel():
    smooth, diff = np.array([1.0, 2.0, 1.0]), np.array([-1.0, 0.0, 1.0])
    k = np.zeros((3, 3, 3, 1, 3), np.float32)
    for axis in range(3):
        parts = [smooth] * 3
        parts[axis] = diff
        k[..., 0, axis] = np.einsum("i,j,k->ijk", *parts) / 16
    np.savez(os.path.join(HERE, "sobel3.npz"), kernel=k, bias=np.zeros(3, np.float32))


def smooth_config():
    cfg = {"class_name": "Conv3D", "config": {
        "name": "smooth", "trainable": True,
        "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
                  "registered_name": None},
        "filters": 2, "kernel_size": [5, 5, 5], "strides": [1, 1, 1], "padding": "same",
        "data_format": "channels_last", "dilation_rate": [1, 1, 1], "groups": 1,
        "activation": "relu", "use_bias": True,
        "kernel_initializer": {"module": "keras.initializers", "class_name": "HeNormal",
                               "config": {"seed": 7}, "registered_name": None},
        "bias_initializer": {"module": "keras.initializers", "class_name": "Constant",
                             "config": {"value": 0.1}, "registered_name": None},
        "kernel_regularizer": {"module": "keras.regularizers", "class_name": "L2",
                               "config": {"l2": 0.01}, "registered_name": None},
        "bias_regularizer": None, "activity_regularizer": None,
        "kernel_constraint": None, "bias_constraint": None}}
    with open(os.path.join(HERE, "smooth.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)


if __name__ == "__main__":
    brain()
    cells()
    grid()
    sobel()
    smooth_config()
