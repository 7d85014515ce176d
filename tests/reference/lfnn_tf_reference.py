"""Writes tests/reference/lfnn_tf_reference.npz: one float64 step of the LFNN authors' Keras code.

Runs the authors' own classes from GitHub Belis0811/LFNN at 7b68aa4 (model/LFNN/MNIST_LFNN.py,
last changed in eeb2fa5; "M"): LFConfig, sparse_ce_per_example, LFWorkerBlock,
leader_follower_losses and LFClassifier, including LFClassifier.train_step itself. It needs
TensorFlow and Keras at the versions the authors' requirements.txt pins, so it runs in its own
environment; regenerate with:

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow==2.18.0 keras==3.6.0 'numpy<2.1'
    git clone https://github.com/Belis0811/LFNN /tmp/LFNN && git -C /tmp/LFNN checkout 7b68aa4
    /tmp/tfenv/bin/python tests/reference/lfnn_tf_reference.py [/tmp/LFNN]

(it was generated with TensorFlow 2.18.0, Keras 3.6.0, numpy 2.0.2 on CPU).

M is a script: importing it would download MNIST and train for 50 epochs. So the script
executes only its definitions, the text of M up to ``def load_data():`` (lines 1-269).
Two lines are changed in that text before it runs, so that the step runs in float64:
M:107 builds the leader mask with ``tf.one_hot(..., dtype=tf.float32)`` and M:125 divides by
``tf.cast(num_workers, tf.float32)``; both become ``tf.float64`` (with Keras's floatx set to
float64 a float32 mask cannot multiply the float64 per-worker CEs). The file in the clone is
not modified; the script checks the file's sha256 and that both lines read as expected.

The net is a small one of the same shape as M's: input 12 -> backbone Dense(16, relu) (the
authors' feature extractor, a Keras functional Model as in M:298-303) -> LFWorkerBlock with
hidden_dim 8 (input_proj Dense(8, relu), 32 worker heads as one Dense(8 -> 320)) and the
global head Dense(8 -> 10), leader_fraction 0.7 (k = 23), all loss weights 1,
use_global_loss True (M:266). Weights are drawn from a seeded numpy generator (not Keras's
init: non-zero biases test more), the batch is 16 samples. One call of the authors'
``train_step`` runs with an optimiser that records the gradients instead of applying them;
the loss trackers' values after that one step are the step's losses.

Saved (kernels in Keras's (in, out) layout):
  x (16, 12), y (16,), for each of backbone / proj / workers / global: <name>_kernel,
  <name>_bias and the total loss's gradients grad_<name>_kernel, grad_<name>_bias;
  losses = [leader, follower, global, total]; leader_idx (16, 23) (argsort order, leaders
  of each sample); per_worker_ce (16, 32); source_sha256.
"""
import hashlib
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

LFNN = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/LFNN")
SOURCE = LFNN / "model" / "LFNN" / "MNIST_LFNN.py"
SHA256 = "e108d4ec4a6de715ef90b84aa061fda5bf6ffa0ba6884c0194e6ff83b81e75e5"  # at 7b68aa4
OUT = Path(__file__).resolve().parent / "lfnn_tf_reference.npz"
IN, FEATURES, HIDDEN, WORKERS, CLASSES, BATCH, DELTA = 12, 16, 8, 32, 10, 16, 0.7


def authors_namespace() -> dict:
    """M's definitions, executed with the two float32 masks of M:107 and M:125 made float64."""
    text = SOURCE.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{SOURCE} has sha256 {digest}, not the 7b68aa4 file ({SHA256})")
    lines = text.split("\n")
    for number, expected in ((107, "tf.one_hot(leader_idx, depth=num_workers, dtype=tf.float32)"),
                             (125, "tf.reduce_sum(leader_mask, axis=1) / tf.cast(num_workers, tf.float32)")):
        assert expected in lines[number - 1], (number, lines[number - 1])
        lines[number - 1] = lines[number - 1].replace("tf.float32", "tf.float64")
    definitions = "\n".join(lines).split("def load_data():")[0]
    namespace: dict = {}
    exec(compile(definitions, str(SOURCE), "exec"), namespace)  # noqa: S102 - the authors' code
    return namespace


class GradientRecorder(tf.keras.optimizers.SGD):
    """Stands in for the authors' Adam inside train_step: keeps the gradients, changes nothing."""

    def apply_gradients(self, grads_and_vars):
        self.recorded = [(g, v) for g, v in grads_and_vars]


def main() -> None:
    tf.keras.backend.set_floatx("float64")
    m = authors_namespace()
    cfg = m["LFConfig"](num_classes=CLASSES, leader_fraction=DELTA, use_global_loss=True)
    inp = tf.keras.Input(shape=(IN,))
    backbone = tf.keras.Model(inp, tf.keras.layers.Dense(FEATURES, activation="relu")(inp), name="backbone")
    model = m["LFClassifier"](feature_extractor=backbone, feature_dim=FEATURES, num_workers=WORKERS, cfg=cfg,
                              hidden_dim=HIDDEN, name="small_lfnn")
    rng = np.random.default_rng(20240731)
    x = rng.standard_normal((BATCH, IN))
    y = rng.integers(0, CLASSES, BATCH).astype("int32")
    model(x[:1])
    dense = {"backbone": backbone.layers[-1], "proj": model.lf_block.input_proj,
             "workers": model.lf_block.worker_logits, "global": model.global_head}
    arrays = {"x": x, "y": y}
    for name, layer in dense.items():
        fan_in, fan_out = layer.kernel.shape
        layer.kernel.assign(rng.uniform(-1, 1, (fan_in, fan_out)) * np.sqrt(3.0 / fan_in))
        layer.bias.assign(rng.uniform(-0.2, 0.2, fan_out))
        arrays[f"{name}_kernel"], arrays[f"{name}_bias"] = layer.kernel.numpy(), layer.bias.numpy()
        assert layer.kernel.dtype == "float64"

    recorder = GradientRecorder(learning_rate=0.0)
    model.compile(optimizer=recorder)
    logs = model.train_step((tf.constant(x), tf.constant(y)))  # M:184-215, the authors' step
    by_var = {id(v): g.numpy() for g, v in recorder.recorded}
    assert len(by_var) == 8 and all(g.dtype == np.float64 for g in by_var.values())
    for name, layer in dense.items():
        arrays[f"grad_{name}_kernel"] = by_var[id(layer.kernel)]
        arrays[f"grad_{name}_bias"] = by_var[id(layer.bias)]
    # the trackers are Means updated once: their values are this step's losses (M:210-213)
    losses = [float(logs[k]) for k in ("leader_loss", "follower_loss", "local_output_loss", "loss")]
    out = model(tf.constant(x), training=True)
    _, _, stats = m["leader_follower_losses"](tf.constant(y), out["worker_logits"], cfg)
    arrays.update(losses=np.array(losses), leader_idx=stats["leader_idx"].numpy(),
                  per_worker_ce=stats["per_worker_ce"].numpy(), source_sha256=np.array(SHA256))
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): TensorFlow {tf.__version__}, Keras {tf.keras.__version__}")
    print("losses leader/follower/global/total:", losses, "k =", stats["leader_idx"].shape[1])


if __name__ == "__main__":
    main()
