# image: ghcr.io/textgen/textgen-train:0.1.0
# Training and export image: Ray's GPU image (CUDA, Ray 2.60.0, Python 3.11) plus TensorFlow with
# CUDA, tf2onnx and textgen. Used by the Ray head and GPU workers of k8s/rayjob.train.yaml and by
# k8s/job.export.yaml. KubeRay sets the container command (`ray start ...`), so no ENTRYPOINT here.
#
# Build from the repository root:
#   docker build -f docker/train.Dockerfile -t ghcr.io/textgen/textgen-train:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2

# The base image runs as user ray (uid 1000, group users = 100); its Python is in ~/anaconda3.
WORKDIR /home/ray/textgen
COPY --chown=1000:100 . .
# The gpu extra: tensorflow[and-cuda], tf2onnx, onnx, ray[train,default] (same Ray as the image).
# The constraints pin every other dependency to the versions the test suite ran with.
RUN pip install -c requirements/constraints.txt ".[gpu]"
