"""The examples of the two user tutorials (shared/seeds/), run through xentfast on the
tutorials' exact inputs.  Expected numbers come from the naive float64 oracle (never
hard-coded) and, when TensorFlow/Keras are installed, from running the tutorial's own
TensorFlow line on the same inputs.

1. "How to implement TensorFlow's softmax cross-entropy?": softmax_cross_entropy_with_logits
   with integer one-hot labels + reduce_mean; the sparse version; the GradientTape
   gradient of reduce_mean(...) with respect to the logits.
2. "TensorFlow NN: Softmax and Cross-Entropy Loss Explained": tf.nn.softmax of
   [2.0, 1.0, 0.1]; keras categorical_crossentropy of [0, 1, 0] vs [0.05, 0.9, 0.05];
   SparseCategoricalCrossentropy(from_logits=True) on a Dense(10) output with MNIST's
   uint8 labels.
"""

from __future__ import annotations

import numpy as np

import naive
import xentfast as xf
from helpers import assert_close, import_peer, to_numpy

# Tutorial 1, verbatim inputs: tf.constant makes float32 logits and int32 labels.
LOGITS = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
ONE_HOT = np.array([[0, 0, 1], [1, 0, 0]], dtype=np.int32)
SPARSE = np.array([2, 0], dtype=np.int32)
F32 = dict(rtol=2e-6, atol=1e-7)


def test_example1_softmax_cross_entropy_with_int_one_hot_labels(backend):
    per_example = xf.softmax_cross_entropy_with_logits(labels=ONE_HOT, logits=LOGITS, backend=backend)
    loss_value = np.mean(per_example)
    expected, _, _ = naive.cross_entropy(LOGITS, ONE_HOT.astype(np.float64), reduction="none")
    assert per_example.dtype == np.float32 and per_example.shape == (2,)
    assert_close(per_example, expected, **F32)
    assert_close(loss_value, np.mean(expected), **F32)
    # the same through the PyTorch-style API (probability labels must be floats there)
    assert_close(xf.cross_entropy(LOGITS, ONE_HOT.astype(np.float32), backend=backend),
                 np.mean(expected), **F32)


def test_example2_sparse_labels(backend):
    per_example = xf.sparse_softmax_cross_entropy_with_logits(labels=SPARSE, logits=LOGITS, backend=backend)
    expected, _, _ = naive.cross_entropy(LOGITS, SPARSE, reduction="none")
    assert_close(per_example, expected, **F32)
    assert_close(np.mean(per_example), np.mean(expected), **F32)
    # the sparse and one-hot forms describe the same labels
    assert_close(per_example, xf.softmax_cross_entropy_with_logits(ONE_HOT, LOGITS, backend=backend), **F32)


def test_example3_gradient_of_reduce_mean(backend):
    """GradientTape of reduce_mean(softmax_cross_entropy_with_logits): our fused
    cross_entropy_with_grad with reduction="mean"."""
    loss, grad = xf.cross_entropy_with_grad(LOGITS, ONE_HOT.astype(np.float32), reduction="mean",
                                            backend=backend)
    exp_loss, exp_grad, _ = naive.cross_entropy(LOGITS, ONE_HOT.astype(np.float64), reduction="mean")
    assert grad.dtype == np.float32 and grad.shape == (2, 3)
    assert_close(loss, exp_loss, **F32)
    assert_close(grad, exp_grad, **F32)
    # (softmax - one_hot) / batch, the closed form the tutorial's tape computes
    assert_close(grad, (naive.softmax(LOGITS) - ONE_HOT) / 2, **F32)
    sparse_loss, sparse_grad = xf.cross_entropy_with_grad(LOGITS, SPARSE, backend=backend)
    assert_close(sparse_grad, exp_grad, **F32)
    assert_close(sparse_loss, exp_loss, **F32)


def test_examples_1_to_3_against_tensorflow(backend):
    tf = import_peer("tensorflow")
    logits = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    labels = tf.constant([[0, 0, 1], [1, 0, 0]])
    tf_loss = tf.nn.softmax_cross_entropy_with_logits(logits=logits, labels=labels)
    assert_close(xf.softmax_cross_entropy_with_logits(labels=ONE_HOT, logits=LOGITS, backend=backend),
                 to_numpy(tf_loss), **F32)
    assert_close(np.mean(xf.softmax_cross_entropy_with_logits(ONE_HOT, LOGITS, backend=backend)),
                 to_numpy(tf.reduce_mean(tf_loss)), **F32)

    tf_sparse = tf.nn.sparse_softmax_cross_entropy_with_logits(logits=logits, labels=tf.constant([2, 0]))
    assert_close(xf.sparse_softmax_cross_entropy_with_logits(labels=SPARSE, logits=LOGITS, backend=backend),
                 to_numpy(tf_sparse), **F32)

    variable = tf.Variable([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(logits=variable, labels=labels))
    gradients = tape.gradient(loss, variable)
    ours_loss, ours_grad = xf.cross_entropy_with_grad(LOGITS, ONE_HOT.astype(np.float32), backend=backend)
    assert_close(ours_loss, to_numpy(loss), **F32)
    assert_close(ours_grad, to_numpy(gradients), **F32)


# Tutorial 2
SOFTMAX_LOGITS = [2.0, 1.0, 0.1]
Y_TRUE = [0, 1, 0]
Y_PRED = [0.05, 0.9, 0.05]


def test_softmax_of_a_list(backend):
    probabilities = xf.softmax(SOFTMAX_LOGITS, backend=backend)
    expected = naive.softmax(np.array(SOFTMAX_LOGITS))
    assert probabilities.shape == (3,)
    assert_close(probabilities, expected, rtol=1e-12, atol=1e-15)
    assert_close(np.sum(probabilities), 1.0, rtol=1e-12)


def test_categorical_crossentropy_on_probabilities(backend):
    loss = xf.categorical_crossentropy(Y_TRUE, Y_PRED, backend=backend)
    expected = naive.keras_categorical(np.array(Y_TRUE, float), np.array(Y_PRED))
    assert np.shape(loss) == ()
    assert loss.dtype == np.float32  # Keras converts Python floats to floatx(), float32
    assert_close(loss, expected, rtol=1e-6)
    assert_close(loss, -np.log(0.9), rtol=1e-6)  # one-hot target: -log p of the true class
    # float64 arrays stay float64, as in Keras
    loss64 = xf.categorical_crossentropy(np.array(Y_TRUE, float), np.array(Y_PRED),
                                         backend=backend)
    assert loss64.dtype == np.float64
    assert_close(loss64, expected, rtol=1e-12)


def _dense10_outputs(rng):
    """A Dense(10) layer's logits for a batch of flattened 28x28 images in [0, 1]."""
    images = rng.integers(0, 256, size=(32, 28 * 28)).astype(np.float32) / np.float32(255.0)
    kernel = (rng.standard_normal((28 * 28, 10)) * 0.05).astype(np.float32)
    labels = rng.integers(0, 10, size=32).astype(np.uint8)  # mnist.load_data() labels are uint8
    return images @ kernel, labels


def test_sparse_categorical_crossentropy_from_logits_mnist_style(backend, rng):
    logits, labels = _dense10_outputs(rng)
    loss_fn = xf.SparseCategoricalCrossentropy(from_logits=True, backend=backend)
    loss = loss_fn(labels, logits)
    per_sample, _, _ = naive.cross_entropy(logits, labels, reduction="none")
    assert np.asarray(loss).dtype == np.float32 and np.ndim(loss) == 0
    assert_close(loss, np.mean(per_sample), rtol=2e-6, atol=1e-7)
    # its gradient is the fused one of cross_entropy_with_grad (mean over the batch)
    _, grad = xf.cross_entropy_with_grad(logits, labels, backend=backend)
    _, exp_grad, _ = naive.cross_entropy(logits, labels)
    assert_close(grad, exp_grad, rtol=2e-5, atol=1e-8)


def test_tutorial2_against_tensorflow_and_keras(backend, rng):
    tf = import_peer("tensorflow")
    keras = import_peer("keras")
    assert_close(xf.softmax(SOFTMAX_LOGITS, backend=backend),
                 to_numpy(tf.nn.softmax(SOFTMAX_LOGITS)), rtol=1e-6, atol=1e-7)
    assert_close(xf.categorical_crossentropy(Y_TRUE, Y_PRED, backend=backend),
                 to_numpy(tf.keras.losses.categorical_crossentropy(Y_TRUE, Y_PRED)), rtol=1e-6)
    logits, labels = _dense10_outputs(rng)
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    got = xf.SparseCategoricalCrossentropy(from_logits=True, backend=backend)(labels, logits)
    assert_close(got, to_numpy(expected), rtol=2e-6, atol=1e-7)
