# image: ghcr.io/textgen/textgen-rayserve:0.1.0
# The Ray Serve variant of the generator (k8s/rayservice.generator.yaml): Ray's CPU image plus the
# `rayserve` extra (the `serve` extra and ray[serve]). No TensorFlow.
#
# Build from the repository root:
#   docker build -f docker/rayserve.Dockerfile -t ghcr.io/textgen/textgen-rayserve:0.1.0 .
FROM rayproject/ray:2.60.0-py311-cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The base image runs as user ray (uid 1000, group users = 100); its Python is in ~/anaconda3.
WORKDIR /home/ray/textgen
COPY --chown=1000:100 . .
RUN pip install -c requirements/constraints.txt ".[rayserve]"
