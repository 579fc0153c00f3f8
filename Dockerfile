# syntax=docker/dockerfile:1.7
# plugconv app image. CPU by default:
#   docker build -t plugconv .
#   docker run --rm -p 7860:7860 plugconv
# CUDA variant (PyPI torch bundles CUDA through nvidia-* wheels; needs the NVIDIA Container Toolkit):
#   docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t plugconv:cuda .
#   docker run --rm --gpus all -p 7860:7860 plugconv:cuda
# Layer order: system user -> torch -> requirements -> weight bake -> code (code edits rebuild only the last layers).
FROM python:3.12-slim

# torch/torchvision index: the CPU wheels (about 1 GB) unless overridden; torch and torchvision must come
# from the same index (a +cpu torch with a PyPI torchvision fails at import).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# set to 0 to build without network access to download.pytorch.org (the app then starts on the bundled model)
ARG PREFETCH_WEIGHTS=1

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_HOME=/opt/torch \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_TEMP_DIR=/tmp/gradio \
    GRADIO_EXAMPLES_CACHE=/tmp/gradio-examples \
    MPLCONFIGDIR=/tmp/matplotlib \
    HF_HUB_OFFLINE=1

RUN useradd -m -u 1000 user && install -d -o user -g user /app /opt/torch
WORKDIR /app

RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY requirements.txt .
# torch==2.14.1 in requirements.txt is satisfied by the installed 2.14.1+cpu, so pip keeps the CPU wheels
RUN pip install -r requirements.txt

# bake the default torchvision weights of every ResNet into $TORCH_HOME (read-only for the app)
COPY --chown=user plugconv/ plugconv/
RUN if [ "$PREFETCH_WEIGHTS" = "1" ]; then python -m plugconv.prefetch; fi && chmod -R a+rX /opt/torch

COPY --chown=user viz/ viz/
COPY --chown=user assets/ assets/
COPY --chown=user app.py README.md pyproject.toml ./

USER user
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"]
CMD ["python", "app.py"]
