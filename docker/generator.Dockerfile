# image: ghcr.io/textgen/textgen-generator:0.1.0
# The HTTP generator: numpy + onnxruntime + FastAPI/uvicorn (the base install and the `serve`
# extra). No TensorFlow, no Ray: the ONNX file is the whole contract. Runs as uid 10001 and works
# with a read-only root filesystem (k8s/deployment.generator.yaml mounts /models and /tmp).
#
# Build from the repository root (needs BuildKit, the default builder since Docker 23):
#   docker build -f docker/generator.Dockerfile -t ghcr.io/textgen/textgen-generator:0.1.0 .
# The model comes from a volume mounted at /models. To bake it into the image instead, put the
# exported file at ./model.onnx and build the with-model target:
#   docker build -f docker/generator.Dockerfile --target with-model \
#     -t ghcr.io/textgen/textgen-generator:0.1.0-alice .

# Install into a virtualenv in a throwaway stage: no source tree or pip cache in the final image.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY . .
RUN pip install -c requirements/constraints.txt ".[serve]"

FROM python:3.11-slim AS runtime
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --gid 10001 textgen \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin textgen
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["textgen", "serve"]
CMD ["/models/model.onnx", "--host", "0.0.0.0", "--port", "8000"]

# Optional: the model inside the image (see the top of this file).
FROM runtime AS with-model
COPY --chmod=0444 model.onnx /models/model.onnx

# The default target (the last stage): no model inside, mount it at /models.
FROM runtime
