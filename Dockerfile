# The web app on a CUDA runtime image. Weights are never baked in: mount them at /app/checkpoints.
#   docker build -t xraygpt-app .
#   docker run --gpus all -p 7860:7860 -v "$PWD/checkpoints:/app/checkpoints:ro" \
#     -e XRAYGPT_AUTH=user:password xraygpt-app
# Research and education only: nothing the app says is a diagnosis.
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    HF_HUB_DISABLE_TELEMETRY=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin xraygpt

WORKDIR /app
# Dependencies first, so code changes do not reinstall torch.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY app.py pyproject.toml README.md ./
COPY xraygpt_app ./xraygpt_app
COPY eval_configs ./eval_configs
COPY examples ./examples
RUN mkdir -p /app/checkpoints && chown xraygpt:xraygpt /app/checkpoints

USER 10001
ENV HOME=/home/xraygpt \
    HF_HOME=/home/xraygpt/.cache/huggingface \
    GRADIO_TEMP_DIR=/tmp/gradio
VOLUME ["/app/checkpoints"]
EXPOSE 7860

# Model loading takes minutes on first start; the check only asks whether the server answers.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=8)"]

# Inside the container the app must listen on all interfaces; publish the port deliberately.
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
