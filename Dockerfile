# bpfree: reproducible environment for `dvc repro` (CPU, or GPU with the NVIDIA container
# runtime: the pinned PyPI torch wheels ship their own CUDA runtime).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends git dataset-fashion-mnist \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /bpfree
COPY requirements.lock pyproject.toml README.md ./
RUN pip install --no-cache-dir -r requirements.lock
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# Mount raw data here (torchvision / GLUE layouts), or leave empty to download when online.
ENV BPFREE_DATA_DIR=/data
VOLUME ["/data"]
CMD ["dvc", "repro"]
